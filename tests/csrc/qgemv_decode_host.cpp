// Host driver for csrc/quant_decode.cuh (used by tests/csrc/test_qgemv_decode.py; compiled with g++, no GPU).
// Reads a packed weight written by the test (params.txt and raw little-endian .bin files in DIR) and writes
// the dequantized fp32 [N, K] weight twice, through the two paths of csrc/lora_qgemv.cu's kernel:
//   vec.bin     the vector path where the kernel takes it (16-byte chunks: 4 words, one ChunkScale per chunk,
//               or g_idx groups per word; the K tail element by element), else identical to scalar.bin;
//   scalar.bin  decode_one for every element (the kernel's fallback for unaligned rows and tails).
// and prints "vec=1" when the vector path was taken. Usage: qgemv_decode_host DIR
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "quant_decode.cuh"

using namespace fastpeft_qd;

namespace {

std::vector<uint8_t> read_file(const std::string& path) {
  std::vector<uint8_t> out;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return out;  // an absent field (e.g. no g_idx)
  unsigned char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.insert(out.end(), buf, buf + n);
  std::fclose(f);
  return out;
}

void write_file(const std::string& path, const std::vector<float>& v) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(v.data(), sizeof(float), v.size(), f) != v.size()) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

// The kernel's vector loop for one row, with the 16-byte loads replaced by memcpy from the host buffer.
template <int FMT, bool GIDX>
void row_vec(const QuantView& v, const float* code, const float* code2, int n, float* out) {
  constexpr int E = WordElems<FMT>::value, kChunkCols = 4 * E;
  const uint8_t* row = row_bytes<FMT>(v, n);
  const int nchunks = v.K / kChunkCols;
  for (int c = 0; c < nchunks; ++c) {
    const int k0 = c * kChunkCols;
    uint32_t words[4];
    std::memcpy(words, row + 16 * c, 16);
    ChunkScale cs = {};
    if (!GIDX) cs = chunk_scale<FMT>(v, code2, n, k0);
    for (int w = 0; w < 4; ++w) {
      const int k = k0 + w * E;
      float f[E];
      if constexpr (GIDX) {
        int g[8];
        for (int e = 0; e < 8; ++e) g[e] = v.g_idx[k + e];
        int4_decode_word_gidx(words[w], v, n, g, f);
      } else {
        decode_word<FMT>(words[w], cs, code, f);
      }
      for (int e = 0; e < E; ++e) out[k + e] = f[e];
    }
  }
  for (int k = nchunks * kChunkCols; k < v.K; ++k) out[k] = decode_one<FMT>(v, code, code2, n, k);
}

template <int FMT>
bool run(const QuantView& v, const float* code, const float* code2, int N, std::vector<float>& vec,
         std::vector<float>& scalar) {
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < v.K; ++k) scalar[(size_t)n * v.K + k] = decode_one<FMT>(v, code, code2, n, k);
  // the launcher's condition for the vector path (quant_decode.cuh), less the pointer's alignment (the test's
  // buffers are copied to aligned memory here)
  const bool vec_ok = chunk_groups_ok<FMT>(v);
  if (!vec_ok) {
    vec = scalar;
    return false;
  }
  for (int n = 0; n < N; ++n) {
    float* out = vec.data() + (size_t)n * v.K;
    if constexpr (FMT == kFmtInt4) {
      if (v.g_idx != nullptr) {
        row_vec<FMT, true>(v, code, code2, n, out);
        continue;
      }
    }
    row_vec<FMT, false>(v, code, code2, n, out);
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  FILE* pf = std::fopen((dir + "/params.txt").c_str(), "r");
  if (pf == nullptr) {
    std::fprintf(stderr, "no %s/params.txt\n", dir.c_str());
    return 2;
  }
  int fmt, N, K, blocksize, blocksize2, scale_dtype, double_quant;
  long long ldq, lds, ldz;
  unsigned offset_bits;
  if (std::fscanf(pf, "%d %d %d %lld %lld %lld %d %d %d %d %u", &fmt, &N, &K, &ldq, &lds, &ldz, &blocksize,
                  &blocksize2, &scale_dtype, &double_quant, &offset_bits) != 11) {
    std::fprintf(stderr, "bad params.txt\n");
    return 2;
  }
  std::fclose(pf);

  // 16-byte aligned copies (std::vector<uint8_t> data need not be), as the kernel's uint4 loads require.
  auto load = [&](const char* name, std::vector<uint64_t>& store) -> const void* {
    const std::vector<uint8_t> bytes = read_file(dir + "/" + name);
    if (bytes.empty()) return nullptr;
    store.assign((bytes.size() + 15) / 8 + 2, 0);
    uint8_t* base = reinterpret_cast<uint8_t*>(store.data());
    base += (16 - reinterpret_cast<uintptr_t>(base) % 16) % 16;
    std::memcpy(base, bytes.data(), bytes.size());
    return base;
  };
  std::vector<uint64_t> q_s, sc_s, z_s, a2_s, g_s, c_s, c2_s;
  QuantView v = {};
  v.q = static_cast<const uint8_t*>(load("q.bin", q_s));
  v.ldq = ldq;
  v.scales = load("scales.bin", sc_s);
  v.lds = lds;
  v.zeros = static_cast<const uint8_t*>(load("zeros.bin", z_s));
  v.ldz = ldz;
  v.absmax2 = static_cast<const float*>(load("absmax2.bin", a2_s));
  v.g_idx = static_cast<const int32_t*>(load("gidx.bin", g_s));
  v.K = K;
  v.blocksize = blocksize;
  v.shift = 0;
  while ((1 << v.shift) < blocksize) ++v.shift;
  v.shift2 = 0;
  while (blocksize2 > 0 && (1 << v.shift2) < blocksize2) ++v.shift2;
  v.block_n = blocksize2 > 0 ? blocksize2 : 1;
  v.scale_dtype = scale_dtype;
  v.double_quant = double_quant;
  v.offset = bits_to_f32(offset_bits);
  const float* code = static_cast<const float*>(load("code.bin", c_s));
  const float* code2 = static_cast<const float*>(load("code2.bin", c2_s));

  std::vector<float> vec((size_t)N * K), scalar((size_t)N * K);
  bool used_vec = false;
  switch (fmt) {
    case kFmtNF4: used_vec = run<kFmtNF4>(v, code, code2, N, vec, scalar); break;
    case kFmtInt4: used_vec = run<kFmtInt4>(v, code, code2, N, vec, scalar); break;
    case kFmtInt8: used_vec = run<kFmtInt8>(v, code, code2, N, vec, scalar); break;
    case kFmtFP8: used_vec = run<kFmtFP8>(v, code, code2, N, vec, scalar); break;
    default: std::fprintf(stderr, "unknown fmt %d\n", fmt); return 2;
  }
  write_file(dir + "/vec.bin", vec);
  write_file(dir + "/scalar.bin", scalar);
  std::printf("vec=%d\n", used_vec ? 1 : 0);
  return 0;
}
