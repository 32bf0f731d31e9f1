// Fused LoRA decode GEMV over a QUANTIZED base weight (M <= 8 rows):
//     S[m, :]  = x[m, :] A^T                                          (fp32, returned: autograd saves it)
//     Y[m, n]  = g[n] * (x[m, :] . deq(W)[n, :] + s * sum_j S[m, j] B[n, j]) (+ bias[n])
// for the packed formats of fastpeft.quant.formats: nf4 (bitsandbytes' flat layout, optional double
// quantization of absmax), int4 (per-row nibbles, group-wise scale + zero, optional g_idx), int8 (per-channel
// scale) and fp8 e4m3fn (block scales). g is the optional DoRA column scale (fp32 [N], nullptr = none).
// Dequantization is csrc/quant_decode.cuh's (bit-identical to formats.dequantize in fp32; tested on the host);
// W is never written to memory: every 16-byte chunk of packed codes is decoded in registers and consumed.
//
// S comes from lora_gemv.cu's shrink kernel (fastpeft_lora_shrink, the same kernel the 16-bit GEMV uses),
// launched first; this GEMV grid is launched behind it with Programmatic Dependent Launch when the caller
// asks (Hopper): it streams W and accumulates x deq(W)^T, then waits (griddepcontrol.wait) before it reads S.
//
// Work split (why not lora_gemv.cu's "one warp per 2 rows")
// -----------------------------------------------------------
// A 4-bit row of K = 4096 is 2 KB, 128 chunks of 16 bytes: one warp per row would loop 4 times and N = 4096
// rows would give 256 blocks of 8 warps, each thread issuing one 16-byte load at a time. Instead a block's
// 256 threads split K: each thread owns the chunks c = sub, sub + tpr, ... (tpr = threads per row group, a
// power of two in 32..256 chosen by the launcher so that a row's chunks cover the group once, K split
// up to 256 ways: split-K inside the block), and the block's threads are cut into 256 / tpr groups of
// kRows = 4 consecutive rows each. So a thread decodes its chunk for 4 rows at once: the x values it loads
// (and converts) for that chunk serve 4 rows, and 4 independent 16-byte loads are in flight per thread.
// N = 4096, K = 4096, nf4: tpr = 128, 8 rows per block, 512 blocks (one chunk per thread); K = 11008 or
// 14336: tpr = 256, 4 rows per block, 1024 blocks - enough to fill 132 SMs without a second pass.
// The partial sums are reduced in a FIXED order (warp butterfly, then per group the warps' partials from
// shared memory in warp order): deterministic, no atomics, one launch for the GEMV, Y written once.
// The LoRA expand (s * S B^T, j < r split over the group's threads the same way) joins the same per-thread
// fp32 accumulators before that reduction; g and the bias are applied to the reduced value, then one store.
//
// Loads: W with 128-bit __ldcs (read once: evict-first, so x, B and the scales stay in L1/L2) when the rows
// are 16-byte aligned and a chunk lies inside one scale group (quant_decode.cuh chunk_groups_ok); otherwise
// (unaligned rows, odd layouts) and for the K tail, one byte per element. The NF4 code book and the
// double-quant code2 table live in shared memory (16 + 256 floats, loaded once per block); a chunk's
// scale (absmax, scale + zero) is loaded once per chunk and row. int4 with g_idx (act order) reads
// the group of every element (neighbouring columns may belong to different groups).
//
// Not measured on a GPU yet (none was at hand): tpr, kRows and the x path (read through L1, not staged in
// shared memory as lora_gemv.cu does for M > 1) are design choices to be tuned with benchmarks/.
// Each W value is used in fp32 as decoded (not rounded to x's dtype first, as the Triton kernel does):
// closer to the float64 reference, and one conversion less per element.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "gemv_common.cuh"
#include "pdl_launch.cuh"
#include "quant_decode.cuh"

using namespace fastpeft_gemv;
using namespace fastpeft_qd;

// lora_gemv.cu: S [M, r] (fp32, row stride lds) = x A^T with its shrink kernel (which triggers programmatic
// dependents at its start). Declared here exactly as defined there.
extern "C" int fastpeft_lora_shrink(const void* x, int64_t ldx, const void* a, int64_t lda, float* s, int64_t lds,
                                    int M, int K, int r, int x_dtype, int ab_dtype, cudaStream_t stream);

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 4;  // rows of W per thread (and per row group)

struct QParams {
  const void* x; int64_t ldx;
  const void* bias;               // [N] in x's dtype, or null
  const float* col_scale;         // [N] fp32 (DoRA's g), or null
  const void* b; int64_t ldb;     // [N, r] fp32 or x's dtype (b_f32); unused when r == 0
  const float* s; int64_t lds;    // [M, r] fp32, from the shrink kernel
  void* y; int64_t ldy;           // [M, N]
  const float* code;              // nf4: [16]
  const float* code2;             // nf4 double quant: [256]
  const float* offset;            // nf4 double quant: the mean offset (a device scalar: no host sync)
  int M, N, K, r;
  float scale;
  int tpr_shift;                  // threads per row group = 1 << tpr_shift
  bool vec_w;                     // 16-byte chunks of W (see the header comment)
  bool vec_x;                     // x rows 16-byte aligned
  bool b_f32;                     // B is fp32 (else x's dtype)
};

// E (8 or 4) consecutive x values from global memory (read-only path; L1-resident across the block's row
// groups): one 16- or 8-byte load when the row is aligned, else element by element.
template <typename T, int E>
__device__ __forceinline__ void ld_x(const T* p, float (&f)[E], bool vec) {
  if (vec) {
    if constexpr (E == 8) {
      unpack8(__ldg(reinterpret_cast<const uint4*>(p)), f, static_cast<T*>(nullptr));
    } else {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
      unpack2(v.x, f[0], f[1], static_cast<T*>(nullptr));
      unpack2(v.y, f[2], f[3], static_cast<T*>(nullptr));
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) f[e] = to_f32(__ldg(p + e));
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// GIDX: int4 with g_idx (a template flag, not a runtime branch: the per-element group path is heavier, and
// the plain int4 kernels should not carry its registers).
// __launch_bounds__(256, 2): with the plain (256) bound ptxas (nvcc 13.0) chose 64-80 registers for several
// instantiations and spilled 4-32 bytes; asking for 2 blocks per SM caps them at 128 and none spills (sm_80 and
// sm_90a, tests/csrc/test_nvcc_compile.py).
template <typename T, int FMT, bool GIDX, int MT>
__global__ void __launch_bounds__(kThreads, 2) lora_qgemv_kernel(const QParams p, const QuantView qv_in) {
  constexpr int R = kRows;
  constexpr int E = WordElems<FMT>::value;  // elements per 32-bit word
  constexpr int kChunkCols = 4 * E;         // elements per 16-byte chunk
  __shared__ float code_s[FMT == kFmtNF4 ? 16 : 1];
  __shared__ float code2_s[FMT == kFmtNF4 ? 256 : 1];
  __shared__ float part[kWarps][MT][R];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  QuantView qv = qv_in;
  if constexpr (FMT == kFmtNF4) {
    if (tid < 16) code_s[tid] = __ldg(p.code + tid);
    if (qv.double_quant) {
      code2_s[tid] = __ldg(p.code2 + tid);  // kThreads == 256 entries
      qv.offset = __ldg(p.offset);
    }
  }
  __syncthreads();

  const int tpr = 1 << p.tpr_shift;
  const int groups = kThreads >> p.tpr_shift;
  const int group = tid >> p.tpr_shift, sub = tid & (tpr - 1);
  const int row0 = blockIdx.x * groups * R;  // first row of the block
  // Rows past N are clamped to N - 1 (valid memory) and never stored: no early return, every thread reaches
  // the barriers and pdl_wait().
  int rows[R];
#pragma unroll
  for (int i = 0; i < R; ++i) rows[i] = min(row0 + group * R + i, p.N - 1);

  float acc[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int i = 0; i < R; ++i) acc[m][i] = 0.f;

  const T* __restrict__ x = static_cast<const T*>(p.x);

  int k_tail = 0;
  if (p.vec_w) {
    const int nchunks = p.K / kChunkCols;
    for (int c = sub; c < nchunks; c += tpr) {
      const int k0 = c * kChunkCols;
      uint4 wv[R];
      ChunkScale cs[R] = {};  // int4 with g_idx resolves groups per element and leaves these unused
#pragma unroll
      for (int i = 0; i < R; ++i) {
        wv[i] = __ldcs(reinterpret_cast<const uint4*>(row_bytes<FMT>(qv, rows[i])) + c);
        if constexpr (!GIDX) cs[i] = chunk_scale<FMT>(qv, code2_s, rows[i], k0);
      }
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const int k = k0 + w * E;
        if constexpr (GIDX) {
          // One row at a time (x reloaded per row, from L1): the per-element scale / zero gathers need the
          // registers that wf[R][8] would hold (with all rows decoded first, M <= 8 spilled on sm_80).
          int g[8];  // the word's groups, shared by the R rows
#pragma unroll
          for (int e = 0; e < 8; ++e) g[e] = __ldg(qv.g_idx + k + e);
#pragma unroll
          for (int i = 0; i < R; ++i) {
            float wf[8];
            int4_decode_word_gidx(word_of(wv[i], w), qv, rows[i], g, wf);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              if (m < p.M) {
                float xf[8];
                ld_x<T, 8>(x + m * p.ldx + k, xf, p.vec_x);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[m][i] = fmaf(xf[e], wf[e], acc[m][i]);
              }
            }
          }
        } else {
          float wf[R][E];
#pragma unroll
          for (int i = 0; i < R; ++i) decode_word<FMT>(word_of(wv[i], w), cs[i], code_s, wf[i]);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            if (m < p.M) {
              float xf[E];
              ld_x<T, E>(x + m * p.ldx + k, xf, p.vec_x);
#pragma unroll
              for (int i = 0; i < R; ++i)
#pragma unroll
                for (int e = 0; e < E; ++e) acc[m][i] = fmaf(xf[e], wf[i][e], acc[m][i]);
            }
          }
        }
      }
    }
    k_tail = nchunks * kChunkCols;
  }
  // The K tail, or all of K when the vector path's conditions do not hold: one element at a time.
  for (int k = k_tail + sub; k < p.K; k += tpr) {
    float wv[R];
#pragma unroll
    for (int i = 0; i < R; ++i) wv[i] = decode_one<FMT>(qv, code_s, code2_s, rows[i], k);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < p.M) {
        const float xv = to_f32(__ldg(x + m * p.ldx + k));
#pragma unroll
        for (int i = 0; i < R; ++i) acc[m][i] = fmaf(xv, wv[i], acc[m][i]);
      }
    }
  }

  // LoRA expand into the same accumulators. S was written by the shrink grid, which may still be running
  // (PDL): wait, then read S through L2 only (ld.cg), never the non-coherent path.
  pdl_wait();
  for (int j = sub; j < p.r; j += tpr) {
    float bv[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t o = (int64_t)rows[i] * p.ldb + j;
      bv[i] = p.b_f32 ? __ldg(static_cast<const float*>(p.b) + o) : to_f32(__ldg(static_cast<const T*>(p.b) + o));
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < p.M) {
        const float sv = p.scale * __ldcg(p.s + m * p.lds + j);
#pragma unroll
        for (int i = 0; i < R; ++i) acc[m][i] = fmaf(sv, bv[i], acc[m][i]);
      }
    }
  }

  // Fixed-order reduction: each warp's butterfly, then per (group, m, row) the group's warps in warp order.
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const float v = warp_sum(acc[m][i]);
      if (lane == 0) part[warp][m][i] = v;
    }
  __syncthreads();
  const int wpg = kWarps / groups;  // warps per row group
  if (tid < groups * MT * R) {      // groups * MT * R <= kThreads: one output per thread at most
    const int g = tid / (MT * R), m = (tid / R) % MT, i = tid % R;
    const int n = row0 + g * R + i;
    if (m < p.M && n < p.N) {
      float v = 0.f;
      for (int w = g * wpg; w < (g + 1) * wpg; ++w) v += part[w][m][i];
      if (p.col_scale != nullptr) v *= __ldg(p.col_scale + n);  // DoRA: g * (...), before the bias
      if (p.bias != nullptr) v += to_f32(__ldg(static_cast<const T*>(p.bias) + n));
      static_cast<T*>(p.y)[(int64_t)m * p.ldy + n] = from_f32<T>(v);
    }
  }
}

int log2_exact(int v) {  // log2 of a power of two, -1 otherwise
  if (v <= 0 || (v & (v - 1))) return -1;
  int s = 0;
  while ((1 << s) < v) ++s;
  return s;
}

template <typename T, int FMT, bool GIDX, int MT>
cudaError_t launch_typed(const QParams& p, const QuantView& q, int blocks, bool use_pdl, cudaStream_t stream) {
  return fastpeft_launch::launch(lora_qgemv_kernel<T, FMT, GIDX, MT>, dim3(blocks), dim3(kThreads), use_pdl, stream,
                                 p, q);
}

template <typename T, int FMT, bool GIDX>
cudaError_t launch_m(const QParams& p, const QuantView& q, int blocks, bool use_pdl, cudaStream_t stream) {
  // M rounded up to a compile-time bound (1, 2, 4, 8): accumulators stay in registers; rows m >= M are
  // skipped by block-uniform branches.
  if (p.M <= 1) return launch_typed<T, FMT, GIDX, 1>(p, q, blocks, use_pdl, stream);
  if (p.M <= 2) return launch_typed<T, FMT, GIDX, 2>(p, q, blocks, use_pdl, stream);
  if (p.M <= 4) return launch_typed<T, FMT, GIDX, 4>(p, q, blocks, use_pdl, stream);
  return launch_typed<T, FMT, GIDX, 8>(p, q, blocks, use_pdl, stream);
}

template <typename T>
cudaError_t launch_fmt(int fmt, const QParams& p, const QuantView& q, int blocks, bool use_pdl, cudaStream_t stream) {
  switch (fmt) {
    case kFmtNF4: return launch_m<T, kFmtNF4, false>(p, q, blocks, use_pdl, stream);
    case kFmtInt4:
      if (q.g_idx != nullptr) return launch_m<T, kFmtInt4, true>(p, q, blocks, use_pdl, stream);
      return launch_m<T, kFmtInt4, false>(p, q, blocks, use_pdl, stream);
    case kFmtInt8: return launch_m<T, kFmtInt8, false>(p, q, blocks, use_pdl, stream);
    default: return launch_m<T, kFmtFP8, false>(p, q, blocks, use_pdl, stream);
  }
}

bool groups_ok(int fmt, const QuantView& q) {
  switch (fmt) {
    case kFmtNF4: return chunk_groups_ok<kFmtNF4>(q);
    case kFmtInt4: return chunk_groups_ok<kFmtInt4>(q);
    case kFmtInt8: return chunk_groups_ok<kFmtInt8>(q);
    default: return chunk_groups_ok<kFmtFP8>(q);
  }
}

}  // namespace

// Returns a cudaError_t value (0 = success). x, y, bias share x_dtype (1 = fp16, 2 = bf16); A and B share
// ab_dtype (0 = fp32, or x_dtype); r = 0: no adapter (a, b, s unused, may be null). All inner strides are 1;
// ld* are row strides in elements (ldq: bytes). The packed weight (fmt = 0 nf4, 1 int4, 2 int8, 3 fp8; see
// fastpeft.quant.formats for the layouts), N x K:
//   nf4   qdata flat bytes (K even); scales fp32 absmax [nblocks], or uint8 codes when absmax2 is given (double
//         quant: code2 fp32 [256], absmax2 fp32, offset fp32 device scalar, blocksize2 a power of two);
//         code fp32 [16]; blocksize a power of two >= 32;
//   int4  qdata [N, ldq] bytes, scales [N, ld_scales] (scale_dtype 0 fp32, 1 fp16, 2 bf16), zeros uint8
//         [N, ld_zeros], g_idx int32 [K] or null (group k / blocksize);
//   int8  qdata int8 [N, ldq], scales fp32 [N];
//   fp8   qdata e4m3fn [N, ldq], scales fp32 [ceil(N / blocksize2), ld_scales], blocks blocksize2 x blocksize.
// col_scale (fp32 [N]) and bias may be null. S (fp32, [M, r], row stride lds) is written when r > 0.
extern "C" int fastpeft_lora_qgemv(const void* x, int64_t ldx, const void* bias, const float* col_scale,
                                   const void* a, int64_t lda, const void* b, int64_t ldb, float* s, int64_t lds,
                                   void* y, int64_t ldy, int M, int N, int K, int r, float scale, int x_dtype,
                                   int ab_dtype, int fmt, const void* qdata, int64_t ldq, const void* scales,
                                   int64_t ld_scales, int scale_dtype, const void* zeros, int64_t ld_zeros,
                                   const float* code, const float* code2, const float* absmax2,
                                   const float* offset, const int* g_idx, int blocksize, int blocksize2,
                                   int use_pdl, cudaStream_t stream) {
  if (M < 0 || M > kMaxM || N < 0 || K < 1 || r < 0 || r > kMaxR) return (int)cudaErrorInvalidValue;
  if (x_dtype != kDtypeF16 && x_dtype != kDtypeBF16) return (int)cudaErrorInvalidValue;
  if (r > 0 && ab_dtype != kDtypeF32 && ab_dtype != x_dtype) return (int)cudaErrorInvalidValue;
  if (x == nullptr || y == nullptr || qdata == nullptr || scales == nullptr) return (int)cudaErrorInvalidValue;
  if (r > 0 && (a == nullptr || b == nullptr || s == nullptr)) return (int)cudaErrorInvalidValue;
  if (fmt < kFmtNF4 || fmt > kFmtFP8 || scale_dtype < kScaleF32 || scale_dtype > kScaleBF16)
    return (int)cudaErrorInvalidValue;
  if (M == 0 || N == 0) return (int)cudaSuccess;

  QuantView q = {};
  q.q = static_cast<const uint8_t*>(qdata);
  q.ldq = ldq;
  q.scales = scales;
  q.lds = ld_scales;
  q.zeros = static_cast<const uint8_t*>(zeros);
  q.ldz = ld_zeros;
  q.absmax2 = absmax2;
  q.g_idx = g_idx;
  q.K = K;
  q.blocksize = blocksize;
  q.scale_dtype = scale_dtype;
  q.double_quant = 0;
  q.offset = 0.f;  // read by the kernel from `offset` (a device scalar)
  q.block_n = 1;
  if (fmt == kFmtNF4) {
    q.shift = log2_exact(blocksize);
    if (K % 2 != 0 || q.shift < 5 || code == nullptr || scale_dtype != kScaleF32) return (int)cudaErrorInvalidValue;
    if (absmax2 != nullptr) {
      q.double_quant = 1;
      q.shift2 = log2_exact(blocksize2);
      if (q.shift2 < 0 || code2 == nullptr || offset == nullptr) return (int)cudaErrorInvalidValue;
    }
  } else if (fmt == kFmtInt4) {
    if (zeros == nullptr || blocksize < 1) return (int)cudaErrorInvalidValue;
  } else if (fmt == kFmtFP8) {
    if (blocksize < 1 || blocksize2 < 1) return (int)cudaErrorInvalidValue;
    q.block_n = blocksize2;
  }

  QParams p = {};
  p.x = x; p.ldx = ldx; p.bias = bias; p.col_scale = col_scale;
  p.b = b; p.ldb = ldb; p.s = s; p.lds = lds; p.y = y; p.ldy = ldy;
  p.code = code; p.code2 = code2; p.offset = offset;
  p.M = M; p.N = N; p.K = K; p.r = r; p.scale = scale;
  p.b_f32 = ab_dtype == kDtypeF32;
  p.vec_x = rows_aligned(x, ldx, 2);
  // 16-byte chunks of W: rows start on 16 bytes and a chunk lies in one scale group (chunk_groups_ok).
  p.vec_w = aligned16(qdata) && groups_ok(fmt, q);

  // Threads per row group: the power of two in 32..256 that covers a row's chunks once (split-K inside the
  // block; see the header comment).
  const int chunk_cols = (fmt == kFmtNF4 || fmt == kFmtInt4) ? 32 : 16;
  const int64_t chunks = (K + chunk_cols - 1) / chunk_cols;
  int shift = 5;
  while (shift < 8 && (int64_t(1) << shift) < chunks) ++shift;
  p.tpr_shift = shift;
  const int rows_per_block = (kThreads >> shift) * kRows;
  const int blocks = (N + rows_per_block - 1) / rows_per_block;

  if (r > 0) {
    const int err = fastpeft_lora_shrink(x, ldx, a, lda, s, lds, M, K, r, x_dtype, ab_dtype, stream);
    if (err != 0) return err;
  }
  // PDL only behind the shrink grid (the GEMV reads x before griddepcontrol.wait: safe, because the shrink
  // grid, launched without the attribute, started only after all earlier work had finished).
  const bool pdl = use_pdl != 0 && r > 0;
  if (x_dtype == kDtypeBF16) return (int)launch_fmt<__nv_bfloat16>(fmt, p, q, blocks, pdl, stream);
  return (int)launch_fmt<__half>(fmt, p, q, blocks, pdl, stream);
}
