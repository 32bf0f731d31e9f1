// Per-format decoding of packed quantized weights, shared by the CUDA decode GEMV (lora_qgemv.cu) and a
// host program (tests/csrc/test_qgemv_decode.py) that checks it bit for bit against
// fastpeft.quant.formats.dequantize without a GPU. Everything here is __host__ __device__, free of loads
// through device-only paths and of CUDA headers, so plain g++ compiles it too (the macros below).
//
// Units: the kernel loads the packed bytes 16 at a time (one uint4) and decodes them one 32-bit word at a
// time: 8 elements of a 4-bit format (nf4, int4), 4 of an 8-bit one (int8, fp8). A word's bytes are in
// memory order b0..b3 (little endian, like every CUDA GPU and x86 host): word = b0 | b1 << 8 | ...
// 4-bit formats put the earlier element in the HIGH nibble, so element 2j is (bj >> 4), element 2j+1 is
// (bj & 15). A 16-byte chunk lies inside one scale group wherever the kernel takes the vector path (it
// checks the conditions), so the group's scale is resolved once per chunk (ChunkScale) and every word of the
// chunk reuses it; only int4 with g_idx (GPTQ act-order) needs a group per element (int4_decode_word_gidx).
//
// Arithmetic is fastpeft.quant.formats' (the reference), in the same order and fp32 rounding:
//   nf4   code[nibble] * absmax; double quant: absmax = code2[q] * absmax2 + offset with the product
//         rounded on its own (never contracted into an FMA: qd_mul_rn), exactly as torch computes it;
//   int4  float(nibble - zero) * scale (the integer difference is exact, one rounding);
//   int8  float(q) * scale;
//   fp8   float(e4m3fn) * scale (the e4m3fn -> fp32 conversion is exact, done with integer ops).
// fp16 / bf16 scales are widened to fp32 by bit manipulation (exact, subnormals included), the same code
// on host and device, so the host test covers what the kernel runs.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define QD_HD __host__ __device__ __forceinline__
#else
#define QD_HD inline
#endif

namespace fastpeft_qd {

// Format ids (the launcher's `fmt` argument and the kernel's template parameter).
constexpr int kFmtNF4 = 0, kFmtInt4 = 1, kFmtInt8 = 2, kFmtFP8 = 3;
// Scale dtype ids (int4 scales may be fp16/bf16/fp32; the other formats' are fp32).
constexpr int kScaleF32 = 0, kScaleF16 = 1, kScaleBF16 = 2;

QD_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

// a * b rounded to fp32 on its own. nvcc contracts a * b + c into an FMA unless the product is __fmul_rn
// (which it never contracts); the host build is compiled with -ffp-contract=off.
QD_HD float qd_mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

QD_HD float bf16_bits_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

QD_HD float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero / subnormal: man * 2^-24, exact in fp32
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));  // inf / NaN
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// One scale value of dtype `sdt` at element index i of p.
QD_HD float load_scale(const void* p, int64_t i, int sdt) {
  if (sdt == kScaleF16) return f16_bits_to_f32(static_cast<const uint16_t*>(p)[i]);
  if (sdt == kScaleBF16) return bf16_bits_to_f32(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// float8_e4m3fn bits -> fp32, exact: sign bit 7, exponent bits 6..3 (bias 7), mantissa bits 2..0; exponent 0
// is subnormal (m * 2^-9); 0x7f / 0xff are NaN (e4m3fn has no infinity).
QD_HD float e4m3fn_to_f32(uint32_t bits) {
  const uint32_t e = (bits >> 3) & 0xfu, m = bits & 0x7u;
  if ((bits & 0x7fu) == 0x7fu) return bits_to_f32(0x7fc00000u);
  if (e == 0) {
    const float v = static_cast<float>(m) * 0.001953125f;
    return (bits & 0x80u) ? -v : v;
  }
  return bits_to_f32(((bits & 0x80u) << 24) | ((e + 120u) << 23) | (m << 20));
}

// The packed weight as the kernel reads it (pointers to device memory there, host memory in the test).
struct QuantView {
  const uint8_t* q;      // nf4: flat bytes of the whole weight; int4: [N, ldq] bytes; int8 / fp8: [N, ldq]
  int64_t ldq;           // bytes between rows (unused by nf4, whose rows are n * K / 2 bytes apart)
  const void* scales;    // nf4: fp32 absmax [nblocks] or uint8 codes (double quant); int4 [N, lds];
                         // int8 fp32 [N]; fp8 fp32 [ceil(N / block_n), lds]
  int64_t lds;           // scale elements between rows (int4, fp8)
  const uint8_t* zeros;  // int4: [N, ldz]
  int64_t ldz;
  const float* absmax2;  // nf4 double quant: fp32 [ceil(nblocks / 2^shift2)]
  const int32_t* g_idx;  // int4 act order: [K] group of each input column, or null (k / blocksize)
  int K;
  int blocksize;         // nf4 block (a power of two), int4 group, fp8 block along K
  int shift;             // nf4: log2(blocksize)
  int shift2;            // nf4 double quant: log2(blocksize2)
  int block_n;           // fp8 block along N
  int scale_dtype;       // kScale* (int4; the others fp32)
  int double_quant;      // nf4
  float offset;          // nf4 double quant: the mean offset (read on the host, passed by value)
};

// What a 16-byte chunk of row n starting at column k0 shares: its group's scale (and int4's zero).
struct ChunkScale {
  float scale;  // nf4: the block's absmax; int4 / int8 / fp8: the scale
  int zero;     // int4
};

// nf4's absmax of block `blk` (flat element index >> shift); code2: the 256-entry table (shared memory on
// the device, in the caller's table on the host).
QD_HD float nf4_absmax(const QuantView& v, const float* code2, int64_t blk) {
  if (!v.double_quant) return static_cast<const float*>(v.scales)[blk];
  const uint8_t c = static_cast<const uint8_t*>(v.scales)[blk];
  return qd_mul_rn(code2[c], v.absmax2[blk >> v.shift2]) + v.offset;
}

// The scale (and zero) of row n's chunk that starts at column k0, for the formats where a chunk lies in one
// group (int4 with g_idx: per element instead, see int4_decode_word_gidx).
template <int FMT>
QD_HD ChunkScale chunk_scale(const QuantView& v, const float* code2, int n, int k0) {
  ChunkScale cs;
  cs.zero = 0;
  if constexpr (FMT == kFmtNF4) {
    cs.scale = nf4_absmax(v, code2, ((int64_t)n * v.K + k0) >> v.shift);
  } else if constexpr (FMT == kFmtInt4) {
    const int g = k0 / v.blocksize;
    cs.scale = load_scale(v.scales, (int64_t)n * v.lds + g, v.scale_dtype);
    cs.zero = v.zeros[(int64_t)n * v.ldz + g];
  } else if constexpr (FMT == kFmtInt8) {
    cs.scale = load_scale(v.scales, n, v.scale_dtype);
  } else {
    cs.scale = load_scale(v.scales, (int64_t)(n / v.block_n) * v.lds + k0 / v.blocksize, v.scale_dtype);
  }
  return cs;
}

// The 4-bit code of element e (0..7) of a word.
QD_HD int nibble(uint32_t word, int e) { return (word >> (8 * (e >> 1) + ((e & 1) ? 0 : 4))) & 0xf; }

// Elements per 32-bit word.
template <int FMT>
struct WordElems {
  static constexpr int value = (FMT == kFmtNF4 || FMT == kFmtInt4) ? 8 : 4;
};

// fp32 values of the word's elements (8 for nf4 / int4, 4 for int8 / fp8) sharing one ChunkScale.
// code: nf4's 16-entry code book (shared memory on the device).
template <int FMT>
QD_HD void decode_word(uint32_t word, const ChunkScale& cs, const float* code, float (&out)[WordElems<FMT>::value]) {
  if constexpr (FMT == kFmtNF4) {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = code[nibble(word, e)] * cs.scale;
  } else if constexpr (FMT == kFmtInt4) {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = static_cast<float>(nibble(word, e) - cs.zero) * cs.scale;
  } else if constexpr (FMT == kFmtInt8) {
#pragma unroll
    for (int e = 0; e < WordElems<FMT>::value; ++e)
      out[e] = static_cast<float>(static_cast<int8_t>((word >> (8 * e)) & 0xffu)) * cs.scale;
  } else {
#pragma unroll
    for (int e = 0; e < WordElems<FMT>::value; ++e) out[e] = e4m3fn_to_f32((word >> (8 * e)) & 0xffu) * cs.scale;
  }
}

// int4 with g_idx: the 8 elements of a word of row n, element e in group g[e] = g_idx[k + e] (an act-order
// permutation puts neighbouring columns in different groups; the caller loads g once for all its rows).
QD_HD void int4_decode_word_gidx(uint32_t word, const QuantView& v, int n, const int (&g)[8], float (&out)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float sc = load_scale(v.scales, (int64_t)n * v.lds + g[e], v.scale_dtype);
    out[e] = static_cast<float>(nibble(word, e) - static_cast<int>(v.zeros[(int64_t)n * v.ldz + g[e]])) * sc;
  }
}

// One element W[n, k] from its byte (the scalar path: unaligned rows, tails, rows that start mid-chunk).
// nf4: k must be such that n * K + k is the flat index (rows of even K start on a byte).
template <int FMT>
QD_HD float decode_one(const QuantView& v, const float* code, const float* code2, int n, int k) {
  if constexpr (FMT == kFmtNF4) {
    const int64_t i = (int64_t)n * v.K + k;
    const uint32_t byte = v.q[i >> 1];
    const int nib = (i & 1) ? (byte & 0xf) : (byte >> 4);
    return code[nib] * nf4_absmax(v, code2, i >> v.shift);
  } else if constexpr (FMT == kFmtInt4) {
    const uint32_t byte = v.q[(int64_t)n * v.ldq + (k >> 1)];
    const int nib = (k & 1) ? (byte & 0xf) : (byte >> 4);
    const int g = v.g_idx != nullptr ? v.g_idx[k] : k / v.blocksize;
    const float sc = load_scale(v.scales, (int64_t)n * v.lds + g, v.scale_dtype);
    return static_cast<float>(nib - static_cast<int>(v.zeros[(int64_t)n * v.ldz + g])) * sc;
  } else if constexpr (FMT == kFmtInt8) {
    const int8_t q = static_cast<int8_t>(v.q[(int64_t)n * v.ldq + k]);
    return static_cast<float>(q) * load_scale(v.scales, n, v.scale_dtype);
  } else {
    const uint32_t bits = v.q[(int64_t)n * v.ldq + k];
    return e4m3fn_to_f32(bits) *
           load_scale(v.scales, (int64_t)(n / v.block_n) * v.lds + k / v.blocksize, v.scale_dtype);
  }
}

// Start of row n's packed bytes (nf4: flat layout, K even, so rows start on a byte).
template <int FMT>
QD_HD const uint8_t* row_bytes(const QuantView& v, int n) {
  if constexpr (FMT == kFmtNF4) return v.q + ((int64_t)n * v.K >> 1);
  return v.q + (int64_t)n * v.ldq;
}

// Whether every row starts on a 16-byte chunk boundary and a chunk of every row lies inside one scale group:
// the vector path's conditions besides the pointer's own alignment, which the launcher checks. Columns per
// chunk 32 (4-bit) or 16 (8-bit); nf4's rows are K / 2 bytes apart, so K % 32 == 0 places them.
template <int FMT>
QD_HD bool chunk_groups_ok(const QuantView& v) {
  if constexpr (FMT == kFmtNF4) return v.K % 32 == 0 && v.blocksize >= 32;  // power-of-two blocks: 32-aligned chunks fit
  if (v.ldq % 16 != 0) return false;
  if constexpr (FMT == kFmtInt4) return v.g_idx != nullptr || v.blocksize % 32 == 0 || v.blocksize >= v.K;
  if constexpr (FMT == kFmtInt8) return true;
  return v.blocksize % 16 == 0 || v.blocksize >= v.K;
}

}  // namespace fastpeft_qd
