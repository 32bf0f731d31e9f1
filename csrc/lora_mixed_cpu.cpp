// Mixed-batch LoRA on the CPU: every row's own adapter term added into Y in one pass (BGMV on a core).
//
//     for each adapter k, for its rows i (a segment of the plan's order):
//         S_i = s_k * x_i A_k^T          [r_k]      (shrink: r_k dot products of length K)
//         Y_i += S_i B_k^T               [N]        (expand: r_k axpys of length N)
//
// This is what fastpeft.ops.cpu_mixed loads (built just in time with the host compiler, -O3 -march=native
// -fopenmp, called through ctypes: no torch headers, a build of about 3 s). It replaces the torch backend's
// grouped path (a gather of x, two batched GEMMs per rank bucket, a scatter-add into Y), whose ops cost more in
// fixed overhead than in arithmetic at a few rows per adapter: here an adapter costs its own rank and nothing is
// gathered, scattered or padded. Blocks of rows run in parallel on torch's OpenMP threads (see run()).
//
// Register tiling: rows of one adapter are taken RB <= 4 at a time. The shrink holds an RB x 4 block of
// 16-lane accumulators (4 rank rows of A against RB rows of x), so each vector of A read from cache serves RB
// rows and each vector of x serves 4 rank rows; the expand holds RB x 32 outputs in registers across the whole
// rank loop and touches Y once per element. Every output element sums in a fixed order that depends only on
// K, N and r (not on which other rows or adapters are in the batch): results are the same from run to run.
//
// Activations x and Y are float32 or bfloat16 (decoded by a 16-bit shift; Y rounded to nearest-even once, after
// the fp32 sum). Weights are float32 or bfloat16 (a bf16 pool is read as it is, with no float32 copy beside it;
// reading half the bytes measured only ~5% faster cold at K = N = 1024, 8 adapters of r 16, bf16 x), and every
// sum is fp32. A [R, K], rows start_k .. start_k + r_k - 1 belong to adapter k. B_k^T comes in panels of 32
// columns, one contiguous run per adapter at the address bptr[k]: [Np / 32, r_k, 32] with Np = N rounded up to
// 32 (zero-padded). The expand of a 32-column chunk reads its r_k x 32 values in one run, then the next chunk's.
// Plain B^T [R, N] would put a chunk's r_k rows a page apart at N = 1024 (fp32), and at r = 64 that many pages
// per chunk overflow the L1 TLB and the prefetcher's streams: ranks 8..64 in one batch ran 22% slower than the
// same total rank at 30 (one thread, adapters in L2). The caller lays out only the adapters a batch uses.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
struct bf16 {
  uint16_t bits;
};

// S of one row block lives on the stack: 4 x kMaxRank floats (fastpeft/ops/cpu_mixed.py's MAX_RANK)
constexpr int64_t kMaxRank = 1024;

// memcpy loads and stores: unaligned access the compiler turns into plain vector moves
inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline v16 load16(const bf16* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  u32x16 w = __builtin_convertvector(h, u32x16) << 16;  // bf16 is the top half of an fp32
  v16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline void store16(bf16* p, v16 v) {
  u32x16 w;
  std::memcpy(&w, &v, sizeof w);
  // round to nearest even on the dropped 16 bits; a NaN keeps a set mantissa bit (quiet), never rounds to inf
  u32x16 nan = (w & 0x7fffffffu) > 0x7f800000u;
  u32x16 rounded = (w + 0x7fffu + ((w >> 16) & 1u)) >> 16;
  u32x16 out = (nan & ((w >> 16) | 0x40u)) | (~nan & rounded);
  u16x16 h = __builtin_convertvector(out, u16x16);
  std::memcpy(p, &h, sizeof h);
}
inline float load1(const float* p) { return *p; }
inline float load1(const bf16* p) {
  uint32_t w = uint32_t(p->bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}
inline void store1(float* p, float v) { *p = v; }
inline void store1(bf16* p, float v) {
  uint32_t w;
  std::memcpy(&w, &v, sizeof w);
  if ((w & 0x7fffffffu) > 0x7f800000u) {
    p->bits = uint16_t((w >> 16) | 0x40u);
    return;
  }
  p->bits = uint16_t((w + 0x7fffu + ((w >> 16) & 1u)) >> 16);
}
inline float hsum(v16 v) {
  float t[16];
  std::memcpy(t, &v, sizeof t);
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += t[i];
  return s;
}

// s[i][j] = x_i . A_j for RB rows of x and JB consecutive rank rows of A (A_j at a + j K)
template <int RB, int JB, typename T, typename W>
inline void dot_tile(const T* const* xr, const W* a, int64_t K, float s[][JB]) {
  v16 acc[RB][JB];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < JB; ++j) acc[i][j] = v16{};
  int64_t q = 0;
  for (; q + 16 <= K; q += 16) {
    v16 xv[RB], av[JB];
    for (int i = 0; i < RB; ++i) xv[i] = load16(xr[i] + q);
    for (int j = 0; j < JB; ++j) av[j] = load16(a + j * K + q);
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < JB; ++j) acc[i][j] += xv[i] * av[j];
  }
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < JB; ++j) {
      float t = hsum(acc[i][j]);
      for (int64_t qq = q; qq < K; ++qq) t += load1(xr[i] + qq) * load1(a + j * K + qq);
      s[i][j] = t;
    }
}

// S[i * r + j] = scale * x_i . A_j for j < r (the shrink of RB rows)
template <int RB, typename T, typename W>
void shrink(const T* const* xr, const W* A, int64_t r, int64_t K, float scale, float* S) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) {
    float s[RB][4];
    dot_tile<RB, 4>(xr, A + j * K, K, s);
    for (int i = 0; i < RB; ++i)
      for (int jj = 0; jj < 4; ++jj) S[i * r + j + jj] = s[i][jj] * scale;
  }
  for (; j < r; ++j) {
    float s[RB][1];
    dot_tile<RB, 1>(xr, A + j * K, K, s);
    for (int i = 0; i < RB; ++i) S[i * r + j] = s[i][0] * scale;
  }
}

// y_i[n] += sum_j S[i * r + j] B^T_j[n] for RB rows (the expand). bp: the adapter's panels, r x 32 values each.
// The last chunk is computed on its zero padding and stored to n < N only.
template <int RB, typename T, typename W>
void expand(T* const* yr, const W* bp, int64_t r, int64_t N, const float* S) {
  for (int64_t n = 0; n < N; n += 32, bp += r * 32) {
    v16 acc[RB][2];
    for (int i = 0; i < RB; ++i) acc[i][0] = acc[i][1] = v16{};
    for (int64_t j = 0; j < r; ++j) {
      v16 b0 = load16(bp + j * 32), b1 = load16(bp + j * 32 + 16);
      for (int i = 0; i < RB; ++i) {
        float sv = S[i * r + j];
        acc[i][0] += sv * b0;
        acc[i][1] += sv * b1;
      }
    }
    if (n + 32 <= N) {
      for (int i = 0; i < RB; ++i) {
        store16(yr[i] + n, load16(yr[i] + n) + acc[i][0]);
        store16(yr[i] + n + 16, load16(yr[i] + n + 16) + acc[i][1]);
      }
    } else {
      for (int i = 0; i < RB; ++i) {
        float t[32];
        std::memcpy(t, &acc[i][0], 64);
        std::memcpy(t + 16, &acc[i][1], 64);
        for (int64_t c = 0; c < N - n; ++c) store1(yr[i] + n + c, load1(yr[i] + n + c) + t[c]);
      }
    }
  }
}

template <int RB, typename T, typename W>
void row_block(const T* x, int64_t ldx, T* y, int64_t ldy, const int64_t* rows, const W* A, const W* bp, int64_t r,
               int64_t K, int64_t N, float scale, float* S) {
  const T* xr[RB];
  T* yr[RB];
  for (int i = 0; i < RB; ++i) {
    xr[i] = x + rows[i] * ldx;
    yr[i] = y + rows[i] * ldy;
  }
  shrink<RB>(xr, A, r, K, scale, S);
  expand<RB>(yr, bp, r, N, S);
}

// One unit of work: up to four rows of one slot (order[t] .. order[t + rows - 1]).
struct Block {
  int64_t slot, t, rows;
};

template <typename T, typename W>
void run_block(const Block& b, const T* x, int64_t ldx, T* y, int64_t ldy, const W* A, const int64_t* bptr,
               const int64_t* order, const int64_t* start, const int64_t* rank, const float* scale,
               int64_t K, int64_t N) {
  float S[4 * kMaxRank];
  const int64_t k = b.slot, r = rank[k];
  const W* a = A + start[k] * K;
  const W* bp = reinterpret_cast<const W*>(bptr[k]);
  const int64_t* rows = order + b.t;
  switch (b.rows) {
    case 4: row_block<4>(x, ldx, y, ldy, rows, a, bp, r, K, N, scale[k], S); break;
    case 3: row_block<3>(x, ldx, y, ldy, rows, a, bp, r, K, N, scale[k], S); break;
    case 2: row_block<2>(x, ldx, y, ldy, rows, a, bp, r, K, N, scale[k], S); break;
    default: row_block<1>(x, ldx, y, ldy, rows, a, bp, r, K, N, scale[k], S); break;
  }
}

// Blocks run in parallel on torch's own OpenMP threads (the library links the libgomp torch has loaded, so
// torch.set_num_threads applies); every output row belongs to one block, so the threads never write the same
// element and the result does not depend on their number. Small calls stay on the calling thread.
constexpr int64_t kParallelMacs = 1 << 15;

template <typename T, typename W>
int run(const T* x, int64_t ldx, T* y, int64_t ldy, const W* A, const int64_t* bptr, const int64_t* order,
        const int64_t* offsets, int64_t slots, const int64_t* start, const int64_t* rank, const float* scale,
        int64_t K, int64_t N) {
  // The plan is checked before anything is written (a hand-built plan must not make the kernel read or write
  // outside x and y): segment offsets non-decreasing from 0, and every row of a slot's segment in [0, M).
  const int64_t M = offsets[slots + 1];
  if (offsets[0] != 0) return 3;
  for (int64_t k = 0; k <= slots; ++k)
    if (offsets[k + 1] < offsets[k]) return 3;
  for (int64_t t = offsets[1]; t < M; ++t)
    if (order[t] < 0 || order[t] >= M) return 3;
  std::vector<Block> blocks;
  int64_t macs = 0;
  for (int64_t k = 0; k < slots; ++k) {
    const int64_t r = rank[k], first = offsets[k + 1], end = offsets[k + 2];
    if (r <= 0 || end <= first) continue;  // an empty slot or one without rows: its rows keep the base output
    if (r > kMaxRank) return 1;
    if (bptr[k] == 0) return 2;  // a slot with rows whose panels were not laid out
    for (int64_t t = first; t < end; t += 4) blocks.push_back({k, t, end - t < 4 ? end - t : 4});
    macs += (end - first) * r * (K + N);
  }
  // Largest blocks first (rank x rows: its cost), so the dynamic schedule ends evenly when ranks differ (8 and
  // 64 in one batch): longest-processing-time order. Which thread runs a block never changes a result.
  std::stable_sort(blocks.begin(), blocks.end(), [rank](const Block& p, const Block& q) {
    return rank[p.slot] * p.rows > rank[q.slot] * q.rows;
  });
  const int64_t n = static_cast<int64_t>(blocks.size());
#pragma omp parallel for schedule(dynamic, 1) if (n > 1 && macs >= kParallelMacs)
  for (int64_t i = 0; i < n; ++i)
    run_block(blocks[i], x, ldx, y, ldy, A, bptr, order, start, rank, scale, K, N);
  return 0;
}

}  // namespace

// The one entry point. x [M, K] and y [M, N] with row strides ldx / ldy (elements; unit column stride),
// bf16_act = 1 for bfloat16 activations (0: float32), bf16_w = 1 for bfloat16 A and panels (0: float32).
// order [M] and offsets [slots + 2]: the plan (rows sorted by slot; segment 0 the base rows, left alone;
// segment k + 1 slot k's rows). start / rank / scale / bptr [slots]: slot k's first row in A, its rank, its
// scale, the address of its B panels. Returns 0; 1 when a slot with rows has a rank above kMaxRank, 2 when it
// has no panels (bptr 0), 3 when the plan is malformed (offsets decreasing or not from 0, a row outside
// [0, M)); in each case nothing is written. (start + rank within A is the caller's check: slot_tables.)
extern "C" int fastpeft_lora_mixed_cpu(int bf16_act, int bf16_w, const void* x, int64_t ldx, void* y, int64_t ldy,
                                       const void* A, const int64_t* bptr, const int64_t* order,
                                       const int64_t* offsets, int64_t slots, const int64_t* start,
                                       const int64_t* rank, const float* scale, int64_t K, int64_t N) {
  // (the four combinations of activation and weight type: one template, instantiated here)
  if (bf16_act && bf16_w)
    return run(static_cast<const bf16*>(x), ldx, static_cast<bf16*>(y), ldy, static_cast<const bf16*>(A), bptr,
               order, offsets, slots, start, rank, scale, K, N);
  if (bf16_act)
    return run(static_cast<const bf16*>(x), ldx, static_cast<bf16*>(y), ldy, static_cast<const float*>(A), bptr,
               order, offsets, slots, start, rank, scale, K, N);
  if (bf16_w)
    return run(static_cast<const float*>(x), ldx, static_cast<float*>(y), ldy, static_cast<const bf16*>(A), bptr,
               order, offsets, slots, start, rank, scale, K, N);
  return run(static_cast<const float*>(x), ldx, static_cast<float*>(y), ldy, static_cast<const float*>(A), bptr,
             order, offsets, slots, start, rank, scale, K, N);
}
