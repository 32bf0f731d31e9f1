// Fused LoRA GEMV for decode (M <= 8 rows):
//     S[m, :]  = x[m, :] A^T                                   (fp32, also returned: autograd saves it)
//     Y[m, n]  = g[n] * (x[m, :] . W[n, :] + s * sum_j S[m, j] B[n, j]) (+ bias[n])
// where g is an optional fp32 output column scale (DoRA's g = m / max(||W + s B A||_row, EPS), computed by
// fastpeft.ops; nullptr = no scale, plain LoRA).
//
// Pure CUDA (runtime headers only); the torch binding lives in binding.cpp.
//
// Why two kernels in one launcher call, not one kernel
// ----------------------------------------------------
// Every output row needs all of S (M x r), and S needs all of A (r x K). Inside ONE grid without a
// grid-wide barrier (cooperative launch is ruled out) the options are:
//   * every block recomputes S: each block re-reads A (r*K elements) and does M*r*K FMAs. A block
//     covers 16 rows of W here, so the extra L2 traffic is r*sizeof(A)/(16*2) times the W traffic
//     (r=16, fp32 A: 2x; r=128: 16x) - far worse than the whole GEMV. Making blocks cover enough rows to
//     amortise it (>> r rows) leaves too few blocks to stream W at full bandwidth for N = 4096.
//   * ticket-ordered producer blocks + spin-wait flags: deadlock-free only with a zeroed global counter
//     per call, i.e. a memset launch anyway, and unsafe when two streams share the counter.
// So the launcher issues a tiny "shrink" kernel (S = x A^T, one block per rank row j) and then the
// GEMV+expand kernel. On Hopper (sm_90+) the second is launched with Programmatic Dependent Launch:
// the shrink kernel triggers its dependents as soon as it starts, the GEMV blocks stream W and
// accumulate x W^T first, and only then execute `griddepcontrol.wait` before reading S. The shrink
// (a few microseconds of latency-bound work on <= 2 MB of A) is thereby hidden behind the W stream,
// which is what a single launch would buy. On older GPUs the two kernels simply run back to back.
// The caller chooses (use_pdl): measured on an H100 it saves ~0.8 us at M = 1 and costs ~1 us at
// M = 8, so fastpeft.ops.cuda_backend enables it for M = 1 only.
//
// The LoRA term is folded into the same fp32 per-lane accumulators as x W^T before the single warp
// reduction, so Y is written exactly once and no [M, N] temporary exists. The column scale g and the bias
// are applied to the reduced fp32 value in the epilogue, just before that one store.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "gemv_common.cuh"
#include "pdl_launch.cuh"

namespace {

using namespace fastpeft_gemv;

// GEMV: 8 warps per block, 2 output rows per warp -> 16 rows per block (N = 4096 gives 256 blocks,
// about two per SM on an H100). Two rows per warp let one x vector load feed two W rows.
constexpr int kGemvWarps = 8;
constexpr int kRowsPerWarp = 2;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kRowsPerBlock = kGemvWarps * kRowsPerWarp;
constexpr int kShrinkThreads = 256;

struct Params {
  const void* x; int64_t ldx;
  const void* w; int64_t ldw;     // may be null: LoRA term only
  const void* bias;               // may be null
  const void* a; int64_t lda;     // [r, K]
  const void* b; int64_t ldb;     // [N, r]
  float* s; int64_t lds;          // [M, r] fp32
  void* y; int64_t ldy;           // [M, N]
  int M, N, K, r;
  float scale;
  bool vec_x;                     // x rows are 16-byte aligned: uint4 loads
  bool vec_w;                     // W rows are 16-byte aligned
  bool vec_shrink;                // x and A rows are 16-byte aligned
  // No col_scale here on purpose: it is a separate argument of lora_gemv_kernel (see there).
};

// ---- scalar / vector loads converted to fp32 (conversions and unpacking: gemv_common.cuh) ---------------
template <typename T> __device__ __forceinline__ float ld1(const T* p) { return to_f32(__ldg(p)); }

// 8 consecutive elements starting at a 16-byte aligned address. `stream` = read-once data (W): use
// the evict-first cache hint so W does not push x, A, B out of L2.
template <typename T>
__device__ __forceinline__ void ld8(const T* p, float (&f)[8], bool stream) {
  const uint4 v = stream ? __ldcs(reinterpret_cast<const uint4*>(p)) : __ldg(reinterpret_cast<const uint4*>(p));
  unpack8(v, f, static_cast<T*>(nullptr));
}
template <>
__device__ __forceinline__ void ld8<float>(const float* p, float (&f)[8], bool) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

// The shrink kernels' block reduction: acc[m] summed over the block's kShrinkThreads threads; thread m < MT
// gets row m's total (the other threads 0). One __syncthreads, in every thread.
template <int MT>
__device__ __forceinline__ float block_row_sums(const float (&acc)[MT], int tid) {
  __shared__ float part[kShrinkThreads / 32][MT];
  const int warp = tid >> 5, lane = tid & 31;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0) part[warp][m] = v;
  }
  __syncthreads();
  float v = 0.f;
  if (tid < MT) {
#pragma unroll
    for (int w = 0; w < kShrinkThreads / 32; ++w) v += part[w][tid];
  }
  return v;
}

// ---- kernel 1: shrink, S[m, j] = x[m] . A[j] ---------------------------------------------------------
// One block per rank row j (r <= 128 blocks); its threads split K. A is read exactly once overall;
// x (M*K 16-bit values, L2-resident) once per block.
template <typename T, typename TA, int MT>
__global__ void __launch_bounds__(kShrinkThreads) lora_shrink_kernel(const Params p) {
  // Let the GEMV grid start streaming W right away; it waits for this grid before reading S.
  pdl_launch_dependents();
  const int j = blockIdx.x;
  const int tid = threadIdx.x;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const TA* __restrict__ arow = static_cast<const TA*>(p.a) + (int64_t)j * p.lda;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  int k_scalar = 0;
  if (p.vec_shrink) {
    const int k8 = p.K & ~7;
#pragma unroll 2
    for (int k = tid * 8; k < k8; k += kShrinkThreads * 8) {
      float af[8];
      ld8(arow + k, af, false);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < p.M) {
          float xf[8];
          ld8(x + m * p.ldx + k, xf, false);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[m] = fmaf(xf[e], af[e], acc[m]);
        }
      }
    }
    k_scalar = k8;
  }
  // Tail (K % 8) or the whole row when some row is not 16-byte aligned.
  for (int k = k_scalar + tid; k < p.K; k += kShrinkThreads) {
    const float av = ld1(arow + k);
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < p.M) acc[m] = fmaf(ld1(x + m * p.ldx + k), av, acc[m]);
  }

  const float v = block_row_sums(acc, tid);
  if (tid < p.M) {
    p.s[tid * p.lds + j] = v;
  }
}

// ---- kernel 2: Y = x W^T + s * S B^T (+ bias) ----------------------------------------------------------
// Each warp owns kRowsPerWarp consecutive rows of W; lane l reads the 16-byte chunks k = 8*l, 8*l+256,
// ... of every row (coalesced 512-byte warp loads), so one x chunk serves all its rows.
//
// Where x comes from: with M = 1, x (K 16-bit values) is read straight from global memory and stays in
// L1. With M > 1 every W chunk needs M x chunks, and measured on an H100 (M = 8, K = N = 4096) the
// streamed W evicted x from L1, so x was re-fetched from L2 for every row pair: 45 us against 16 us
// for cuBLAS. So for M > 1 the block stages x in shared memory, kXChunk columns at a time
// (MT * kXChunk * 2 bytes = 32 KB at MT = 8), and the warps read x from there: 34 us at M = 8 and
// 22 us at M = 4 (cuBLAS without LoRA: 16 us); M = 1 runs at 16.2 us, like cuBLAS. Staging x already
// converted to fp32 (to save the per-row-pair unpacking) measured slower (38-43 us at M = 8).
// What is left at M = 8 is the inner loop's instruction count (128 FMAs + 64 x unpacks per 16 W
// values per lane) and the per-chunk staging bubble; more rows per warp, cp.async double buffering of
// the x chunk, or tensor cores (mma with M padded to 8/16) are the next steps.
constexpr int kXChunk = 2048;

// x chunk loads: __ldg (read-only path) from global memory; LDS.128 from the shared-memory chunk
// (__ldg must never see a shared address).
template <bool kShared, typename T>
__device__ __forceinline__ void ld8_x(const T* p, float (&f)[8]) {
  if constexpr (kShared) {
    // Explicit LDS.128: with a plain dereference nvcc split the second unrolled copy into 4 x LDS.32.
    uint4 v;
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr)
                 : "memory");  // volatile + memory: never CSE/hoist across chunks or barriers
    unpack8(v, f, static_cast<T*>(nullptr));
  } else {
    ld8(p, f, false);
  }
}

template <bool kShared, typename T, int MT, int R>
__device__ __forceinline__ void fma_chunk(float (&acc)[MT][R], const float (&wf)[R][8], const T* xm_k, int M,
                                          int64_t ldx) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < M) {
      float xf[8];
      ld8_x<kShared>(xm_k + m * ldx, xf);
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[m][i] = fmaf(xf[e], wf[i][e], acc[m][i]);
    }
  }
}

// x W^T over columns [k0, k1) for this warp's rows; x row m of that range starts at xk[m * ldx] (global
// memory or the shared-memory chunk, both indexed relative to k0). k0 is a multiple of 8.
template <bool kShared, typename T, int MT, int R>
__device__ __forceinline__ void gemv_range(float (&acc)[MT][R], const T* __restrict__ w, const int (&rows)[R],
                                           int64_t ldw, const T* xk, int64_t ldx, int M, int k0, int k1, bool vec,
                                           int lane) {
  int k_scalar = k0;
  if (vec) {
    const int kv = k0 + ((k1 - k0) & ~7);
#pragma unroll 2
    for (int k = k0 + lane * 8; k < kv; k += 32 * 8) {
      float wf[R][8];
#pragma unroll
      for (int i = 0; i < R; ++i) ld8(w + (int64_t)rows[i] * ldw + k, wf[i], true);
      fma_chunk<kShared, T, MT, R>(acc, wf, xk + (k - k0), M, ldx);
    }
    k_scalar = kv;
  }
  // Tail (K % 8) or everything when some W row is not 16-byte aligned.
  for (int k = k_scalar + lane; k < k1; k += 32) {
    float wv[R];
#pragma unroll
    for (int i = 0; i < R; ++i) wv[i] = ld1(w + (int64_t)rows[i] * ldw + k);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        const float xv = to_f32(xk[m * ldx + (k - k0)]);
#pragma unroll
        for (int i = 0; i < R; ++i) acc[m][i] = fmaf(xv, wv[i], acc[m][i]);
      }
    }
  }
}

// x W^T for this warp's rows, added into acc (nothing without a base weight). Shared by the single-adapter
// and the mixed GEMV kernels; force-inlined, so each kernel compiles as if it were its own body (ptxas -v: the
// single-adapter kernels kept their register counts when this was split out of lora_gemv_kernel).
template <typename T, int MT, int R>
__device__ __forceinline__ void base_gemv(float (&acc)[MT][R], const Params& p, const int (&rows)[R], int lane) {
  constexpr bool kStageX = MT > 1;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  if (p.w != nullptr) {
    const T* __restrict__ w = static_cast<const T*>(p.w);
    if constexpr (!kStageX) {
      gemv_range<false, T, MT, R>(acc, w, rows, p.ldw, x, p.ldx, p.M, 0, p.K, p.vec_x && p.vec_w, lane);
    } else {
      __shared__ uint4 xs_raw[MT * kXChunk / 8];  // uint4: 16-byte aligned rows of kXChunk values
      T* xs = reinterpret_cast<T*>(xs_raw);
      for (int k0 = 0; k0 < p.K; k0 += kXChunk) {
        const int len = min(kXChunk, p.K - k0);
        if (p.vec_x) {
          const int lv = len & ~7;
          for (int idx = threadIdx.x * 8; idx < MT * kXChunk; idx += kGemvThreads * 8) {
            const int m = idx / kXChunk, c = idx % kXChunk;
            if (m < p.M && c < lv)
              *reinterpret_cast<uint4*>(xs + idx) = __ldg(reinterpret_cast<const uint4*>(x + m * p.ldx + k0 + c));
          }
          for (int idx = threadIdx.x; idx < MT * 8; idx += kGemvThreads) {  // the < 8 values past lv
            const int m = idx / 8, c = lv + idx % 8;
            if (m < p.M && c < len) xs[m * kXChunk + c] = x[m * p.ldx + k0 + c];
          }
        } else {
          for (int idx = threadIdx.x; idx < MT * kXChunk; idx += kGemvThreads) {
            const int m = idx / kXChunk, c = idx % kXChunk;
            if (m < p.M && c < len) xs[idx] = x[m * p.ldx + k0 + c];
          }
        }
        __syncthreads();
        // xs rows are 16-byte aligned and k0 % 8 == 0, so only W decides between vector and scalar.
        gemv_range<true, T, MT, R>(acc, w, rows, p.ldw, xs, kXChunk, p.M, k0, k0 + len, p.vec_w, lane);
        __syncthreads();  // before the next chunk overwrites xs
      }
    }
  }
}

// The one store of Y: one butterfly reduction per (m, row); afterwards every lane holds every sum and lane
// m*R+i stores element (m, row i), after the column scale (DoRA; nullptr = none) and the bias.
template <typename T, int MT, int R>
__device__ __forceinline__ void store_y(float (&acc)[MT][R], const Params& p, const float* __restrict__ col_scale,
                                        int n0, int lane) {
  T* __restrict__ y = static_cast<T*>(p.y);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      float v = warp_sum(acc[m][i]);
      const int n = n0 + i;
      if (lane == m * R + i && m < p.M && n < p.N) {
        // DoRA: Y = g * (x W^T + s S B^T) + bias, on the fp32 sum, before the bias and the one store.
        // A runtime nullptr test, not a template flag: it runs once per stored element, after the K
        // loop, on a kernel-uniform condition, so it adds no register to the main loop (ptxas -v: no
        // instantiation uses more registers than before) and no measurable time, while a template flag
        // would double the GEMV instantiations (16 -> 32), and with them the binary and the just-in-time
        // build time. The mixed kernel passes a literal nullptr, so the test is compiled out there.
        if (col_scale != nullptr) v *= __ldg(col_scale + n);
        if (bias != nullptr) v += ld1(bias + n);
        y[(int64_t)m * p.ldy + n] = from_f32<T>(v);
      }
    }
  }
}

// col_scale: DoRA's g [N] fp32, or nullptr. A separate kernel parameter rather than a Params field: growing
// Params from 128 to 136 bytes changed ptxas' register allocation in BOTH kernels (nvcc 13.0: the shrink
// kernel went from 48 to 62 registers at M = 4 with fp32 A, the sm_80 GEMV at M = 8 from 73 to 92, and the
// sm_80 bf16 GEMV at M = 2 spilled 4 bytes), while as its own parameter the counts stay as they were.
template <typename T, typename TB, int MT>
__global__ void __launch_bounds__(kGemvThreads) lora_gemv_kernel(const Params p, const float* __restrict__ col_scale) {
  constexpr int R = kRowsPerWarp;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * kGemvWarps + warp) * R;
  // Rows past N are clamped to N-1 (valid memory) and never stored; no early return, so every
  // thread reaches the barriers and pdl_wait(), and this grid cannot finish before the shrink grid.
  int rows[R];
#pragma unroll
  for (int i = 0; i < R; ++i) rows[i] = min(n0 + i, p.N - 1);

  float acc[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int i = 0; i < R; ++i) acc[m][i] = 0.f;

  base_gemv<T, MT, R>(acc, p, rows, lane);

  // S comes from the shrink grid: wait for it (PDL), then read it through L2 only (ld.cg), never
  // through the non-coherent/L1 path, since it was written while this grid was already running.
  pdl_wait();
  const TB* __restrict__ b = static_cast<const TB*>(p.b);
  for (int j = lane; j < p.r; j += 32) {
    float bv[R];
#pragma unroll
    for (int i = 0; i < R; ++i) bv[i] = ld1(b + (int64_t)rows[i] * p.ldb + j);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < p.M) {
        const float sv = p.scale * __ldcg(p.s + m * p.lds + j);
#pragma unroll
        for (int i = 0; i < R; ++i) acc[m][i] = fmaf(sv, bv[i], acc[m][i]);
      }
    }
  }

  store_y<T, MT, R>(acc, p, col_scale, n0, lane);
}

// ---- mixed batches (BGMV): every row its own adapter ------------------------------------------------------
//     S[m, j]  = x[m] . A_k[j]  for j < r_k, 0 for r_k <= j < s_cols      k = row_index[m]
//     Y[m, n]  = x[m] . W[n] + s_k * sum_{j < r_k} S[m, j] B_k[n, j] (+ bias[n])
// row_index[m] = -1: the base alone (S row all zero). Same two kernels as above, same single store of Y; each
// row reads its own adapter's A (shrink) and B (expand) and loops to its own rank, so a rank-8 adapter next
// to a rank-64 one does rank-8 work. S is reduced in a fixed order (warp butterflies, then one thread
// sums the warps): deterministic, no atomics.
//
// Adapter addressing: the adapters arrive as separate tensors. The options were
//   * concatenated storage with offsets: copying every active adapter's A and B (r * (K + N) values each)
//     into one buffer per call costs as much memory traffic as the LoRA reads themselves, plus an
//     allocation, for nothing;
//   * a device table of per-adapter pointers built per call: a host-to-device copy per call (an extra
//     copy launch, and pinned staging memory that must outlive it), whose address a CUDA graph would bake in;
//   * (chosen) the table BY VALUE, as a kernel parameter. A decode batch of M <= kMaxM rows touches at most
//     M adapters, and the host knows which from the plan's offsets (host ints: no sync), so a table of
//     the adapters that have rows fits in kMaxM slots (MixedTable, 400 bytes; kernel parameters may take
//     4 KB): no copy, no allocation, no extra launch. row_index itself stays on the device; each row finds
//     its slot by comparing row_index[m] with the <= kMaxM slot ids (find_slot, a few compares per block).
// The table is a separate kernel parameter beside Params (not in it), for the reason col_scale is: Params
// stays 128 bytes and the single-adapter kernels are untouched (not even re-instantiated).
// CUDA graphs: a captured launch keeps the table it was captured with (which adapters, their pointers,
// ranks and scales); a replay reads the current row_index but that table. A row whose row_index names an
// adapter outside the table (or any value below -1) gets NaN in its S row and its Y row - poisoned, never
// silently base-only. Replaying with a different set of adapters needs the kernel nodes updated
// (cudaGraphExecKernelNodeSetParams) or a new capture; a device table would need the same (a fixed
// address refreshed by a captured copy).
struct MixedSlot {
  const void* a; int64_t lda;  // A_k [r, K] (unused when r == 0)
  const void* b; int64_t ldb;  // B_k [N, r]
  int64_t id;                  // k: the value of row_index that selects this adapter
  int r;                       // 0 <= r <= s_cols (rank 0: the row gets the base alone)
  float scale;
};
struct MixedTable {
  MixedSlot slot[kMaxM];
  const int64_t* row_index;    // [M] on the device: adapter per row, -1 = base only
  int n;                       // slots in use
};
constexpr int kSlotBase = -1, kSlotMissing = -2;

// Slot of row m's adapter, kSlotBase for row_index -1, kSlotMissing for a value the table lacks.
__device__ __forceinline__ int find_slot(const MixedTable& t, int m) {
  const int64_t id = __ldg(t.row_index + m);
  int slot = id == -1 ? kSlotBase : kSlotMissing;
#pragma unroll
  for (int q = 0; q < kMaxM; ++q)
    if (q < t.n && t.slot[q].id == id) slot = q;
  return slot;
}

// Shrink, one block per column j < s_cols of S (p.r = s_cols): row m dots x[m] with row j of its own
// adapter's A, or writes 0 (base row, or j >= r_k). Rows that share an adapter read the same A row (the
// second read hits L1); A is read from memory once per adapter overall.
template <typename T, typename TA, int MT>
__global__ void __launch_bounds__(kShrinkThreads) lora_shrink_mixed_kernel(const Params p, const MixedTable t) {
  pdl_launch_dependents();
  const int j = blockIdx.x;
  const int tid = threadIdx.x;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const TA* arow[MT];  // row m's A row j, or nullptr: nothing to compute for row m in this block
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    arow[m] = nullptr;
    if (m < p.M) {
      const int q = find_slot(t, m);
      if (q >= 0 && j < t.slot[q].r)
        arow[m] = static_cast<const TA*>(t.slot[q].a) + (int64_t)j * t.slot[q].lda;
    }
  }
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  int k_scalar = 0;
  if (p.vec_shrink) {  // x and every slot's A rows 16-byte aligned
    const int k8 = p.K & ~7;
#pragma unroll 2
    for (int k = tid * 8; k < k8; k += kShrinkThreads * 8) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (arow[m] != nullptr) {
          float af[8], xf[8];
          ld8(arow[m] + k, af, false);
          ld8(x + m * p.ldx + k, xf, false);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[m] = fmaf(xf[e], af[e], acc[m]);
        }
      }
    }
    k_scalar = k8;
  }
  for (int k = k_scalar + tid; k < p.K; k += kShrinkThreads) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (arow[m] != nullptr) acc[m] = fmaf(ld1(x + m * p.ldx + k), ld1(arow[m] + k), acc[m]);
  }

  const float v = block_row_sums(acc, tid);
  if (tid < p.M) {
    // base rows and j >= r_k: 0; an adapter missing from the table: NaN (see "CUDA graphs" above)
    p.s[tid * p.lds + j] = find_slot(t, tid) == kSlotMissing ? __int_as_float(0x7fc00000) : v;
  }
}

// GEMV + expand: base_gemv as in lora_gemv_kernel; then row m adds s_k * S[m, :r_k] B_k^T for its own
// adapter k, so B is read per row (rows of one adapter re-read its B rows from L1/L2).
template <typename T, typename TB, int MT>
__global__ void __launch_bounds__(kGemvThreads) lora_gemv_mixed_kernel(const Params p, const MixedTable t) {
  constexpr int R = kRowsPerWarp;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * kGemvWarps + warp) * R;
  int rows[R];  // clamped as in lora_gemv_kernel: no early return before the barriers and pdl_wait()
#pragma unroll
  for (int i = 0; i < R; ++i) rows[i] = min(n0 + i, p.N - 1);

  float acc[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int i = 0; i < R; ++i) acc[m][i] = 0.f;

  base_gemv<T, MT, R>(acc, p, rows, lane);

  pdl_wait();  // S (and, read after it, row_index: safe either way, it was written before the shrink grid)
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < p.M) {
      const int q = find_slot(t, m);
      if (q >= 0) {
        const TB* __restrict__ b = static_cast<const TB*>(t.slot[q].b);
        const int64_t ldb = t.slot[q].ldb;
        const int r = t.slot[q].r;
        const float scale = t.slot[q].scale;
        for (int j = lane; j < r; j += 32) {
          const float sv = scale * __ldcg(p.s + m * p.lds + j);
#pragma unroll
          for (int i = 0; i < R; ++i) acc[m][i] = fmaf(sv, ld1(b + (int64_t)rows[i] * ldb + j), acc[m][i]);
        }
      } else if (q == kSlotMissing) {
#pragma unroll
        for (int i = 0; i < R; ++i) acc[m][i] = __int_as_float(0x7fc00000);  // see "CUDA graphs" above
      }
    }
  }

  store_y<T, MT, R>(acc, p, nullptr, n0, lane);
}

template <typename T, typename TA, int MT>
cudaError_t launch_typed(const Params& p, const float* col_scale, bool use_pdl, cudaStream_t stream) {
  lora_shrink_kernel<T, TA, MT><<<p.r, kShrinkThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  return fastpeft_launch::launch(lora_gemv_kernel<T, TA, MT>, dim3((p.N + kRowsPerBlock - 1) / kRowsPerBlock),
                                 dim3(kGemvThreads), use_pdl, stream, p, col_scale);
}

template <typename T, typename TA>
cudaError_t launch_m(const Params& p, const float* col_scale, bool use_pdl, cudaStream_t stream) {
  // M is rounded up to a compile-time bound (1, 2, 4, 8) so accumulators stay in registers; rows
  // m >= M are skipped by warp-uniform branches.
  if (p.M <= 1) return launch_typed<T, TA, 1>(p, col_scale, use_pdl, stream);
  if (p.M <= 2) return launch_typed<T, TA, 2>(p, col_scale, use_pdl, stream);
  if (p.M <= 4) return launch_typed<T, TA, 4>(p, col_scale, use_pdl, stream);
  return launch_typed<T, TA, 8>(p, col_scale, use_pdl, stream);
}

template <typename T>
cudaError_t launch_ab(const Params& p, const float* col_scale, int ab_dtype, bool use_pdl, cudaStream_t stream) {
  if (ab_dtype == kDtypeF32) return launch_m<T, float>(p, col_scale, use_pdl, stream);
  return launch_m<T, T>(p, col_scale, use_pdl, stream);
}

template <typename T, typename TA, int MT>
cudaError_t launch_mixed_typed(const Params& p, const MixedTable& t, bool use_pdl, cudaStream_t stream) {
  if (p.r > 0) {  // p.r = s_cols; none: every adapter has rank 0 (or there are none), S has no columns
    lora_shrink_mixed_kernel<T, TA, MT><<<p.r, kShrinkThreads, 0, stream>>>(p, t);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.N == 0) return cudaSuccess;  // S only

  // PDL only behind the shrink grid: the GEMV reads x before griddepcontrol.wait, which is safe because the
  // shrink grid (launched without the attribute) started only after everything before it had finished.
  return fastpeft_launch::launch(lora_gemv_mixed_kernel<T, TA, MT>, dim3((p.N + kRowsPerBlock - 1) / kRowsPerBlock),
                                 dim3(kGemvThreads), use_pdl && p.r > 0, stream, p, t);
}

template <typename T, typename TA>
cudaError_t launch_mixed_m(const Params& p, const MixedTable& t, bool use_pdl, cudaStream_t stream) {
  if (p.M <= 1) return launch_mixed_typed<T, TA, 1>(p, t, use_pdl, stream);
  if (p.M <= 2) return launch_mixed_typed<T, TA, 2>(p, t, use_pdl, stream);
  if (p.M <= 4) return launch_mixed_typed<T, TA, 4>(p, t, use_pdl, stream);
  return launch_mixed_typed<T, TA, 8>(p, t, use_pdl, stream);
}

template <typename T>
cudaError_t launch_mixed_ab(const Params& p, const MixedTable& t, int ab_dtype, bool use_pdl, cudaStream_t stream) {
  if (ab_dtype == kDtypeF32) return launch_mixed_m<T, float>(p, t, use_pdl, stream);
  return launch_mixed_m<T, T>(p, t, use_pdl, stream);
}

// The shrink kernel alone (fastpeft_lora_shrink, for lora_qgemv.cu): the same instantiations launch_typed uses.
template <typename T, typename TA>
cudaError_t launch_shrink_m(const Params& p, cudaStream_t stream) {
  if (p.M <= 1) lora_shrink_kernel<T, TA, 1><<<p.r, kShrinkThreads, 0, stream>>>(p);
  else if (p.M <= 2) lora_shrink_kernel<T, TA, 2><<<p.r, kShrinkThreads, 0, stream>>>(p);
  else if (p.M <= 4) lora_shrink_kernel<T, TA, 4><<<p.r, kShrinkThreads, 0, stream>>>(p);
  else lora_shrink_kernel<T, TA, 8><<<p.r, kShrinkThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_shrink_ab(const Params& p, int ab_dtype, cudaStream_t stream) {
  if (ab_dtype == kDtypeF32) return launch_shrink_m<T, float>(p, stream);
  return launch_shrink_m<T, T>(p, stream);
}

}  // namespace

// Returns a cudaError_t value (0 = success). x, w, y, bias share x_dtype (1 = fp16, 2 = bf16); A and B
// share ab_dtype (0 = fp32, or x_dtype). All inner strides are 1; ld* are row strides in elements.
// w, bias and col_scale may be null; col_scale is fp32 [N] (contiguous), multiplied into x W^T + s S B^T
// before the bias is added. S (fp32, [M, r], row stride lds) is written as a by-product.
extern "C" int fastpeft_lora_gemv(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* bias,
                                  const float* col_scale, const void* a, int64_t lda, const void* b,
                                  int64_t ldb, float* s, int64_t lds, void* y, int64_t ldy, int M, int N, int K,
                                  int r, float scale, int x_dtype, int ab_dtype, int use_pdl, cudaStream_t stream) {
  if (M < 0 || M > kMaxM || N < 0 || K < 0 || r < 1 || r > kMaxR) return (int)cudaErrorInvalidValue;
  if (x_dtype != kDtypeF16 && x_dtype != kDtypeBF16) return (int)cudaErrorInvalidValue;
  if (ab_dtype != kDtypeF32 && ab_dtype != x_dtype) return (int)cudaErrorInvalidValue;
  if (x == nullptr || a == nullptr || b == nullptr || s == nullptr || y == nullptr) return (int)cudaErrorInvalidValue;
  if (M == 0 || N == 0) return (int)cudaSuccess;

  Params p;
  p.x = x; p.ldx = ldx; p.w = w; p.ldw = ldw; p.bias = bias;
  p.a = a; p.lda = lda; p.b = b; p.ldb = ldb; p.s = s; p.lds = lds; p.y = y; p.ldy = ldy;
  p.M = M; p.N = N; p.K = K; p.r = r; p.scale = scale;
  const int ab_bytes = ab_dtype == kDtypeF32 ? 4 : 2;
  p.vec_x = rows_aligned(x, ldx, 2);
  p.vec_w = rows_aligned(w, ldw, 2);
  p.vec_shrink = rows_aligned(x, ldx, 2) && rows_aligned(a, lda, ab_bytes);

  if (x_dtype == kDtypeBF16) return (int)launch_ab<__nv_bfloat16>(p, col_scale, ab_dtype, use_pdl != 0, stream);
  return (int)launch_ab<__half>(p, col_scale, ab_dtype, use_pdl != 0, stream);
}


// A mixed batch (see "mixed batches" above). Returns a cudaError_t value (0 = success). x, w, y, bias share
// x_dtype; every adapter's A and B share ab_dtype (0 = fp32, or x_dtype). The n_adapters (<= 8) adapters are
// host arrays: adapter q is selected by rows whose row_index equals adapter_ids[q] (distinct, >= 0), has
// rank ranks[q] (0..s_cols), A a[q] [r, K] (row stride lda[q]), B b[q] [N, r] (row stride ldb[q]) and scale
// scales[q]. row_index: device int64 [M], -1 = base only. S: fp32 [M, s_cols] (s_cols <= 128), row m holding
// its adapter's r values in its first columns and zeros after them. w and bias may be null; with N == 0
// only S is computed.
extern "C" int fastpeft_lora_gemv_mixed(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* bias,
                                        const int64_t* row_index, int n_adapters, const int64_t* adapter_ids,
                                        const void* const* a, const int64_t* lda, const void* const* b,
                                        const int64_t* ldb, const int* ranks, const float* scales, float* s,
                                        int64_t lds, void* y, int64_t ldy, int M, int N, int K, int s_cols,
                                        int x_dtype, int ab_dtype, int use_pdl, cudaStream_t stream) {
  if (M < 0 || M > kMaxM || N < 0 || K < 0 || s_cols < 0 || s_cols > kMaxR) return (int)cudaErrorInvalidValue;
  if (n_adapters < 0 || n_adapters > kMaxM) return (int)cudaErrorInvalidValue;
  if (x_dtype != kDtypeF16 && x_dtype != kDtypeBF16) return (int)cudaErrorInvalidValue;
  if (ab_dtype != kDtypeF32 && ab_dtype != x_dtype) return (int)cudaErrorInvalidValue;
  if (x == nullptr || row_index == nullptr || (s == nullptr && s_cols > 0) || (y == nullptr && N > 0))
    return (int)cudaErrorInvalidValue;
  if (n_adapters > 0 && (adapter_ids == nullptr || a == nullptr || lda == nullptr || b == nullptr ||
                         ldb == nullptr || ranks == nullptr || scales == nullptr))
    return (int)cudaErrorInvalidValue;
  if (M == 0) return (int)cudaSuccess;

  const int ab_bytes = ab_dtype == kDtypeF32 ? 4 : 2;
  MixedTable t = {};
  t.row_index = row_index;
  t.n = n_adapters;
  bool a_aligned = true;
  for (int q = 0; q < n_adapters; ++q) {
    const int r = ranks[q];
    if (r < 0 || r > s_cols || adapter_ids[q] < 0) return (int)cudaErrorInvalidValue;
    if (r > 0 && (a[q] == nullptr || b[q] == nullptr)) return (int)cudaErrorInvalidValue;
    for (int o = 0; o < q; ++o)
      if (adapter_ids[o] == adapter_ids[q]) return (int)cudaErrorInvalidValue;
    t.slot[q].a = a[q]; t.slot[q].lda = lda[q];
    t.slot[q].b = b[q]; t.slot[q].ldb = ldb[q];
    t.slot[q].id = adapter_ids[q];
    t.slot[q].r = r;
    t.slot[q].scale = scales[q];
    if (r > 0) a_aligned = a_aligned && rows_aligned(a[q], lda[q], ab_bytes);
  }

  Params p = {};
  p.x = x; p.ldx = ldx; p.w = w; p.ldw = ldw; p.bias = bias;
  p.a = nullptr; p.lda = 0; p.b = nullptr; p.ldb = 0;  // per row: the table's slots
  p.s = s; p.lds = lds; p.y = y; p.ldy = ldy;
  p.M = M; p.N = N; p.K = K; p.r = s_cols; p.scale = 0.f;
  p.vec_x = rows_aligned(x, ldx, 2);
  p.vec_w = rows_aligned(w, ldw, 2);
  p.vec_shrink = rows_aligned(x, ldx, 2) && a_aligned;

  if (x_dtype == kDtypeBF16) return (int)launch_mixed_ab<__nv_bfloat16>(p, t, ab_dtype, use_pdl != 0, stream);
  return (int)launch_mixed_ab<__half>(p, t, ab_dtype, use_pdl != 0, stream);
}


// S = x A^T alone (fp32 [M, r], row stride lds): the shrink kernel above, shared with the quantized decode GEMV
// (csrc/lora_qgemv.cu), which launches its own GEMV behind it (the shrink triggers programmatic dependents at
// its start, so a PDL launch after it overlaps as it does here). Returns a cudaError_t value (0 = success).
extern "C" int fastpeft_lora_shrink(const void* x, int64_t ldx, const void* a, int64_t lda, float* s, int64_t lds,
                                    int M, int K, int r, int x_dtype, int ab_dtype, cudaStream_t stream) {
  if (M < 0 || M > kMaxM || K < 0 || r < 1 || r > kMaxR) return (int)cudaErrorInvalidValue;
  if (x_dtype != kDtypeF16 && x_dtype != kDtypeBF16) return (int)cudaErrorInvalidValue;
  if (ab_dtype != kDtypeF32 && ab_dtype != x_dtype) return (int)cudaErrorInvalidValue;
  if (x == nullptr || a == nullptr || s == nullptr) return (int)cudaErrorInvalidValue;
  if (M == 0) return (int)cudaSuccess;

  Params p = {};
  p.x = x; p.ldx = ldx; p.a = a; p.lda = lda; p.s = s; p.lds = lds;
  p.M = M; p.N = 0; p.K = K; p.r = r; p.scale = 1.f;
  const int ab_bytes = ab_dtype == kDtypeF32 ? 4 : 2;
  p.vec_x = rows_aligned(x, ldx, 2);
  p.vec_shrink = rows_aligned(x, ldx, 2) && rows_aligned(a, lda, ab_bytes);

  if (x_dtype == kDtypeBF16) return (int)launch_shrink_ab<__nv_bfloat16>(p, ab_dtype, stream);
  return (int)launch_shrink_ab<__half>(p, ab_dtype, stream);
}
