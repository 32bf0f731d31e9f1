// Shared by the two decode GEMVs (lora_gemv.cu: 16-bit W; lora_qgemv.cu: packed W): the dtype codes and bounds
// of their launchers, fp32 conversions of the 16-bit types, unpacking of packed 16-bit pairs, the warp
// reduction, the Programmatic Dependent Launch device hooks and the host-side alignment tests.
// Device functions are __forceinline__ and host ones inline: where they live changes no kernel's code or
// register count (tests/csrc/test_nvcc_compile.py records the counts).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace fastpeft_gemv {

constexpr int kDtypeF32 = 0, kDtypeF16 = 1, kDtypeBF16 = 2;  // the launchers' dtype codes (binding.cpp's)
constexpr int kMaxM = 8, kMaxR = 128;                        // rows and rank the GEMVs hold in registers

__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Two packed 16-bit values -> fp32 (bf16: a shift; fp16: the hardware conversion).
__device__ __forceinline__ void unpack2(uint32_t u, float& lo, float& hi, __nv_bfloat16*) {
  lo = __uint_as_float(u << 16);
  hi = __uint_as_float(u & 0xffff0000u);
}
__device__ __forceinline__ void unpack2(uint32_t u, float& lo, float& hi, __half*) {
  const float2 t = __half22float2(*reinterpret_cast<const __half2*>(&u));
  lo = t.x;
  hi = t.y;
}

// Eight packed 16-bit values (one uint4) -> fp32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8], T* tag) {
  unpack2(v.x, f[0], f[1], tag);
  unpack2(v.y, f[2], f[3], tag);
  unpack2(v.z, f[4], f[5], tag);
  unpack2(v.w, f[6], f[7], tag);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Programmatic Dependent Launch hooks (PTX griddepcontrol, sm_90+); no-ops when the grid was not launched with
// the programmatic-serialization attribute (pdl_launch.cuh) or before sm_90.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }
// Rows of elem_bytes-sized elements, row stride ld, all 16-byte aligned (null: nothing to load, so yes).
inline bool rows_aligned(const void* ptr, int64_t ld, int elem_bytes) {
  return ptr == nullptr || (aligned16(ptr) && (ld * elem_bytes) % 16 == 0);
}

}  // namespace fastpeft_gemv
