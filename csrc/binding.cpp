// The one torch binding for csrc/: checks tensors, allocates outputs and calls the pure-CUDA launchers
// on the current stream. Built as `fastpeft._C` by setup.py (FASTPEFT_BUILD_CUDA=1) or just in time by
// fastpeft/ops/cuda_backend.py. pybind (not TORCH_LIBRARY) on purpose: the ahead-of-time and the JIT
// module may both be loaded in one process, and two TORCH_LIBRARY registrations of one namespace
// would collide; the torch.library custom op wrapping lives in fastpeft.ops.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

extern "C" int fastpeft_lora_gemv(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* bias,
                                  const float* col_scale, const void* a, int64_t lda, const void* b,
                                  int64_t ldb, float* s, int64_t lds, void* y, int64_t ldy, int M, int N, int K,
                                  int r, float scale, int x_dtype, int ab_dtype, int use_pdl, cudaStream_t stream);
extern "C" int fastpeft_lora_gemv_mixed(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* bias,
                                        const int64_t* row_index, int n_adapters, const int64_t* adapter_ids,
                                        const void* const* a, const int64_t* lda, const void* const* b,
                                        const int64_t* ldb, const int* ranks, const float* scales, float* s,
                                        int64_t lds, void* y, int64_t ldy, int M, int N, int K, int s_cols,
                                        int x_dtype, int ab_dtype, int use_pdl, cudaStream_t stream);
extern "C" int fastpeft_lora_qgemv(const void* x, int64_t ldx, const void* bias, const float* col_scale,
                                   const void* a, int64_t lda, const void* b, int64_t ldb, float* s, int64_t lds,
                                   void* y, int64_t ldy, int M, int N, int K, int r, float scale, int x_dtype,
                                   int ab_dtype, int fmt, const void* qdata, int64_t ldq, const void* scales,
                                   int64_t ld_scales, int scale_dtype, const void* zeros, int64_t ld_zeros,
                                   const float* code, const float* code2, const float* absmax2,
                                   const float* offset, const int* g_idx, int blocksize, int blocksize2,
                                   int use_pdl, cudaStream_t stream);

namespace {

// Argument errors are returned, not thrown: lora_gemv returns (Y, S, error) and the Python wrapper
// (fastpeft.ops.cuda_backend.gemv) raises RuntimeError(error). Messages are built by plain string
// concatenation, never through std::ostream: on the H100 test machine (torch 2.11, JIT build with
// /opt/gcc g++ 13.3) formatting an integer through an ostream inside this module - which TORCH_CHECK
// does too - segfaulted (strings, dtypes and devices printed fine), and so did throwing from here.
using Result = std::tuple<at::Tensor, at::Tensor, std::string>;

inline std::string text(const char* v) { return v; }
inline std::string text(const std::string& v) { return v; }
inline std::string text(int v) { return std::to_string(v); }
inline std::string text(long v) { return std::to_string(v); }
inline std::string text(long long v) { return std::to_string(v); }
inline std::string text(at::ScalarType v) { return c10::toString(v); }
inline std::string text(const c10::Device& v) { return v.str(); }
inline std::string text(at::IntArrayRef v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}

template <typename... Args>
Result error(const Args&... args) {
  std::string msg;
  ((msg += text(args)), ...);
  return Result{at::Tensor(), at::Tensor(), msg};
}
#define FP_CHECK(cond, ...)                     \
  do {                                          \
    if (!(cond)) return error(__VA_ARGS__);     \
  } while (0)

constexpr int64_t kMaxM = 8;
constexpr int64_t kMaxR = 128;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: return -1;
  }
}

// The kernels take row strides and need unit inner strides; a decode-sized tensor is cheap to copy.
at::Tensor unit_inner(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

#define FP_CHECK_DEVICE(t, name)                                                                      \
  do {                                                                                                \
    FP_CHECK((t).is_cuda(), name, " must be a CUDA tensor, found device ", (t).device());             \
    FP_CHECK((t).device() == x_in.device(), name, " is on ", (t).device(), " but x is on ", x_in.device()); \
  } while (0)

// The outputs of a call: the caller's preallocated Y [M, N] in x's dtype and S [M, s_cols] float32, checked
// (serving loops, CUDA graphs, and the tests, which poison them), or new ones. (Y, S, "") or the error.
Result outputs(const at::Tensor& x_in, int64_t M, int64_t N, int64_t s_cols, const char* s_cols_name,
               const std::optional<at::Tensor>& y_out, const std::optional<at::Tensor>& s_out) {
  at::Tensor y, s;
  if (y_out.has_value()) {
    y = *y_out;
    FP_CHECK_DEVICE(y, "out");
    FP_CHECK(y.dim() == 2 && y.size(0) == M && y.size(1) == N && y.stride(1) == 1 &&
             y.scalar_type() == x_in.scalar_type(),
             "out must be [M=", M, ", N=", N, "] in ", x_in.scalar_type(),
             " with unit inner stride, found ", y.sizes(), " ", y.scalar_type(), " strides ", y.strides());
  } else {
    y = at::empty({M, N}, x_in.options());
  }
  if (s_out.has_value()) {
    s = *s_out;
    FP_CHECK_DEVICE(s, "s_out");
    FP_CHECK(s.dim() == 2 && s.size(0) == M && s.size(1) == s_cols && s.stride(1) == 1 &&
             s.scalar_type() == at::kFloat,
             "s_out must be float32 [M=", M, ", ", s_cols_name, "=", s_cols,
             "] with unit inner stride, found ", s.sizes(), " ", s.scalar_type(), " strides ", s.strides());
  } else {
    s = at::empty({M, s_cols}, x_in.options().dtype(at::kFloat));
  }
  return Result{y, s, std::string()};
}

// The epilogue tensors of both GEMV ops, each optional: bias [N] in x's dtype and DoRA's col_scale [N]
// float32, made contiguous. (bias, col_scale, "") - undefined tensors where absent - or the error.
Result epilogue(const at::Tensor& x_in, int64_t N, const std::optional<at::Tensor>& bias_in,
                const std::optional<at::Tensor>& col_scale_in) {
  at::Tensor bias, col_scale;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    FP_CHECK_DEVICE(bias, "bias");
    FP_CHECK(bias.dim() == 1 && bias.size(0) == N, "bias must be [N=", N, "], found ", bias.sizes());
    FP_CHECK(bias.scalar_type() == x_in.scalar_type(), "bias dtype ", bias.scalar_type(), " must equal x dtype ",
             x_in.scalar_type());
  }
  if (col_scale_in.has_value()) {
    col_scale = col_scale_in->contiguous();
    FP_CHECK_DEVICE(col_scale, "col_scale");
    FP_CHECK(col_scale.dim() == 1 && col_scale.size(0) == N, "col_scale must be [N=", N, "], found ",
             col_scale.sizes());
    FP_CHECK(col_scale.scalar_type() == at::kFloat, "col_scale must be float32, found ", col_scale.scalar_type());
  }
  return Result{bias, col_scale, std::string()};
}

// (Y [M, N] in x.dtype, S [M, r] fp32, "") or (None, None, error message), where
// Y = g * (x W^T + scale * S B^T) (+ bias) and S = x A^T; g = col_scale (float32 [N], DoRA's output column
// scale) when given, else 1.
Result lora_gemv(const at::Tensor& x_in, const std::optional<at::Tensor>& w_in,
                 const std::optional<at::Tensor>& bias_in, const at::Tensor& a_in, const at::Tensor& b_in,
                 double scale, bool use_pdl, const std::optional<at::Tensor>& y_out,
                 const std::optional<at::Tensor>& s_out, const std::optional<at::Tensor>& col_scale_in) {
  FP_CHECK(x_in.dim() == 2, "x must be 2-D [M, K], found shape ", x_in.sizes());
  FP_CHECK(x_in.is_cuda(), "x must be a CUDA tensor, found device ", x_in.device());
  const int64_t M = x_in.size(0), K = x_in.size(1);
  FP_CHECK(M <= kMaxM, "M (rows of x) must be <= ", kMaxM, ", found ", M);
  const int xd = dtype_code(x_in.scalar_type());
  FP_CHECK(xd == 1 || xd == 2, "x must be float16 or bfloat16, found ", x_in.scalar_type());
  FP_CHECK(a_in.dim() == 2 && a_in.size(1) == K, "lora_A must be [r, K=", K, "], found ",
           a_in.sizes());
  const int64_t r = a_in.size(0);
  FP_CHECK(r >= 1 && r <= kMaxR, "rank r must be in [1, ", kMaxR, "], found ", r);
  FP_CHECK(b_in.dim() == 2 && b_in.size(1) == r, "lora_B must be [N, r=", r, "], found ",
           b_in.sizes());
  const int64_t N = b_in.size(0);
  FP_CHECK_DEVICE(a_in, "lora_A");
  FP_CHECK_DEVICE(b_in, "lora_B");
  const int ad = dtype_code(a_in.scalar_type());
  FP_CHECK(a_in.scalar_type() == b_in.scalar_type() && (ad == 0 || ad == xd),
           "lora_A and lora_B must share a dtype, float32 or x's (", x_in.scalar_type(),
           "); found ", a_in.scalar_type(), " and ", b_in.scalar_type());
  FP_CHECK(K <= INT32_MAX && N <= INT32_MAX, "K and N must fit in int32");

  at::Tensor x = unit_inner(x_in), a = unit_inner(a_in), b = unit_inner(b_in);
  at::Tensor w, bias;
  if (w_in.has_value()) {
    w = unit_inner(*w_in);
    FP_CHECK_DEVICE(w, "weight");
    FP_CHECK(w.dim() == 2 && w.size(0) == N && w.size(1) == K, "weight must be [N=", N,
             ", K=", K, "], found ", w.sizes());
    FP_CHECK(w.scalar_type() == x.scalar_type(), "weight dtype ", w.scalar_type(),
             " must equal x dtype ", x.scalar_type());
  }
  Result ep = epilogue(x_in, N, bias_in, col_scale_in);
  if (!std::get<2>(ep).empty()) return ep;
  bias = std::get<0>(ep);
  at::Tensor col_scale = std::get<1>(ep);

  const c10::cuda::CUDAGuard guard(x.device());
  Result out = outputs(x_in, M, N, r, "r", y_out, s_out);
  if (!std::get<2>(out).empty()) return out;
  at::Tensor y = std::get<0>(out), s = std::get<1>(out);
  if (M == 0) return Result{y, s, std::string()};
  if (N == 0) {  // nothing for the kernels to write into; S is still part of the contract
    s.copy_(at::matmul(x.to(at::kFloat), a.to(at::kFloat).t()));
    return Result{y, s, std::string()};
  }
  // A row stride is meaningless for a single row (a [1, K] view may carry any stride(0)); pass 0 so the
  // kernels' 16-byte alignment test looks only at the base pointer.
  const int64_t ldx = M == 1 ? 0 : x.stride(0);
  const int64_t lda = r == 1 ? 0 : a.stride(0);
  const int err = fastpeft_lora_gemv(
      x.data_ptr(), ldx, w.defined() ? w.data_ptr() : nullptr, w.defined() ? w.stride(0) : 0,
      bias.defined() ? bias.data_ptr() : nullptr, col_scale.defined() ? col_scale.data_ptr<float>() : nullptr,
      a.data_ptr(), lda, b.data_ptr(), b.stride(0),
      s.data_ptr<float>(), s.stride(0), y.data_ptr(), y.stride(0), (int)M, (int)N, (int)K, (int)r, (float)scale, xd,
      ad, use_pdl ? 1 : 0, c10::cuda::getCurrentCUDAStream().stream());
  FP_CHECK(err == 0, "CUDA launch failed: ", cudaGetErrorString((cudaError_t)err));
  return Result{y, s, std::string()};
}

// A mixed batch (BGMV): row m of x takes the adapter q whose adapter_ids[q] equals row_index[m] (-1: the base
// alone). lora_As/lora_Bs/scales/adapter_ids list the adapters that have rows in this batch (at most M <= 8;
// fastpeft.ops.cuda_backend compacts the call's adapters to those), each of its own rank r_q (0 allowed).
// Returns (Y [M, N] in x.dtype, S [M, s_cols] fp32, "") or (None, None, error message), where
// S[m, :r_q] = x[m] A_q^T and S[m, r_q:] = 0, Y[m] = x[m] W^T + scale_q * S[m, :r_q] B_q^T (+ bias).
// row_index is not read on the host (no sync): a value that names no listed adapter gives a NaN row.
Result lora_gemv_mixed(const at::Tensor& x_in, const std::optional<at::Tensor>& w_in,
                       const std::optional<at::Tensor>& bias_in, const std::vector<at::Tensor>& as_in,
                       const std::vector<at::Tensor>& bs_in, const std::vector<double>& scales,
                       const std::vector<int64_t>& adapter_ids, const at::Tensor& row_index_in, int64_t s_cols,
                       bool use_pdl, const std::optional<at::Tensor>& y_out, const std::optional<at::Tensor>& s_out) {
  FP_CHECK(x_in.dim() == 2, "x must be 2-D [M, K], found shape ", x_in.sizes());
  FP_CHECK(x_in.is_cuda(), "x must be a CUDA tensor, found device ", x_in.device());
  const int64_t M = x_in.size(0), K = x_in.size(1);
  FP_CHECK(M <= kMaxM, "M (rows of x) must be <= ", kMaxM, ", found ", M);
  const int xd = dtype_code(x_in.scalar_type());
  FP_CHECK(xd == 1 || xd == 2, "x must be float16 or bfloat16, found ", x_in.scalar_type());
  const int64_t n = (int64_t)as_in.size();
  FP_CHECK((int64_t)bs_in.size() == n && (int64_t)scales.size() == n && (int64_t)adapter_ids.size() == n,
           "lora_As, lora_Bs, scales and adapter_ids must have one entry per adapter; found ", n, ", ",
           (int64_t)bs_in.size(), ", ", (int64_t)scales.size(), " and ", (int64_t)adapter_ids.size());
  FP_CHECK(n <= kMaxM, "a mixed decode call takes at most ", kMaxM, " adapters (those with rows), found ", n);
  FP_CHECK(s_cols >= 0 && s_cols <= kMaxR, "s_cols (columns of S, the largest rank) must be in [0, ", kMaxR,
           "], found ", s_cols);
  FP_CHECK(row_index_in.dim() == 1 && row_index_in.size(0) == M && row_index_in.scalar_type() == at::kLong,
           "row_index must be int64 [M=", M, "], found ", row_index_in.sizes(), " ", row_index_in.scalar_type());
  FP_CHECK_DEVICE(row_index_in, "row_index");

  // N: the weight's, else the first adapter's, else the bias'
  int64_t N = -1;
  if (w_in.has_value()) {
    FP_CHECK(w_in->dim() == 2, "weight must be 2-D [N, K], found ", w_in->sizes());
    N = w_in->size(0);
  } else if (n > 0) {
    FP_CHECK(bs_in[0].dim() == 2, "lora_B (adapter 0) must be 2-D [N, r], found ", bs_in[0].sizes());
    N = bs_in[0].size(0);
  } else if (bias_in.has_value() && bias_in->dim() == 1) {
    N = bias_in->size(0);
  }
  FP_CHECK(N >= 0, "a mixed call without a weight, adapters or bias has no output size N");
  FP_CHECK(K <= INT32_MAX && N <= INT32_MAX, "K and N must fit in int32");

  std::vector<at::Tensor> as, bs;
  std::vector<const void*> a_ptr, b_ptr;
  std::vector<int64_t> lda, ldb;
  std::vector<int> ranks;
  std::vector<float> scale_f;
  int ad = xd;  // A/B dtype code (x's when there are no adapters)
  for (int64_t q = 0; q < n; ++q) {
    const at::Tensor &a_q = as_in[q], &b_q = bs_in[q];
    FP_CHECK(a_q.dim() == 2 && a_q.size(1) == K, "lora_A (adapter ", q, ") must be [r, K=", K, "], found ",
             a_q.sizes());
    const int64_t r = a_q.size(0);
    FP_CHECK(r <= s_cols, "rank r of adapter ", q, " must be <= s_cols=", s_cols, ", found ", r);
    FP_CHECK(b_q.dim() == 2 && b_q.size(0) == N && b_q.size(1) == r, "lora_B (adapter ", q, ") must be [N=", N,
             ", r=", r, "], found ", b_q.sizes());
    FP_CHECK_DEVICE(a_q, "lora_A");
    FP_CHECK_DEVICE(b_q, "lora_B");
    const int adq = dtype_code(a_q.scalar_type());
    FP_CHECK(a_q.scalar_type() == b_q.scalar_type() && (adq == 0 || adq == xd),
             "lora_A and lora_B must share a dtype, float32 or x's (", x_in.scalar_type(), "); found ",
             a_q.scalar_type(), " and ", b_q.scalar_type(), " (adapter ", q, ")");
    FP_CHECK(q == 0 || adq == ad, "every adapter of a mixed call must have the same lora_A/lora_B dtype; adapter ",
             q, " has ", a_q.scalar_type(), ", adapter 0 ", as_in[0].scalar_type());
    ad = adq;
    FP_CHECK(adapter_ids[q] >= 0, "adapter_ids must be >= 0 (-1 in row_index is the base), found ", adapter_ids[q]);
    for (int64_t o = 0; o < q; ++o)
      FP_CHECK(adapter_ids[o] != adapter_ids[q], "adapter_ids must be distinct; ", adapter_ids[q], " is listed twice");
    as.push_back(unit_inner(a_q));
    bs.push_back(unit_inner(b_q));
    a_ptr.push_back(r > 0 ? as.back().data_ptr() : nullptr);
    b_ptr.push_back(r > 0 ? bs.back().data_ptr() : nullptr);
    lda.push_back(r > 1 ? as.back().stride(0) : 0);  // a single row's stride is meaningless (see lora_gemv)
    ldb.push_back(r > 0 ? bs.back().stride(0) : 0);
    ranks.push_back((int)r);
    scale_f.push_back((float)scales[q]);
  }

  at::Tensor x = unit_inner(x_in), row_index = row_index_in.contiguous();
  at::Tensor w, bias;
  if (w_in.has_value()) {
    w = unit_inner(*w_in);
    FP_CHECK_DEVICE(w, "weight");
    FP_CHECK(w.size(0) == N && w.size(1) == K, "weight must be [N=", N, ", K=", K, "], found ", w.sizes());
    FP_CHECK(w.scalar_type() == x.scalar_type(), "weight dtype ", w.scalar_type(), " must equal x dtype ",
             x.scalar_type());
  }
  Result ep = epilogue(x_in, N, bias_in, std::nullopt);
  if (!std::get<2>(ep).empty()) return ep;
  bias = std::get<0>(ep);

  const c10::cuda::CUDAGuard guard(x.device());
  Result out = outputs(x_in, M, N, s_cols, "s_cols", y_out, s_out);
  if (!std::get<2>(out).empty()) return out;
  at::Tensor y = std::get<0>(out), s = std::get<1>(out);
  if (M == 0) return Result{y, s, std::string()};
  const int64_t ldx = M == 1 ? 0 : x.stride(0);
  const int err = fastpeft_lora_gemv_mixed(
      x.data_ptr(), ldx, w.defined() ? w.data_ptr() : nullptr, w.defined() ? w.stride(0) : 0,
      bias.defined() ? bias.data_ptr() : nullptr, row_index.data_ptr<int64_t>(), (int)n,
      adapter_ids.data(), a_ptr.data(), lda.data(), b_ptr.data(), ldb.data(), ranks.data(), scale_f.data(),
      s_cols > 0 ? s.data_ptr<float>() : nullptr, s.stride(0), N > 0 ? y.data_ptr() : nullptr, y.stride(0),
      (int)M, (int)N, (int)K, (int)s_cols, xd, ad, use_pdl ? 1 : 0, c10::cuda::getCurrentCUDAStream().stream());
  FP_CHECK(err == 0, "CUDA launch failed: ", cudaGetErrorString((cudaError_t)err));
  return Result{y, s, std::string()};
}

// Fused LoRA decode GEMV over a packed quantized weight (csrc/lora_qgemv.cu; layouts: fastpeft.quant.formats):
// (Y [M, N] in x.dtype, S [M, r] fp32, "") or (None, None, error), Y = col_scale * (x deq(W)^T + scale * S B^T)
// (+ bias), S = x A^T. lora_A / lora_B may be None (no adapter: S is [M, 0]). Unused fields are None.
Result lora_qgemv(const at::Tensor& x_in, const std::string& fmt, const at::Tensor& qdata_in,
                  const at::Tensor& scales_in, const std::optional<at::Tensor>& zeros_in,
                  const std::optional<at::Tensor>& code_in, const std::optional<at::Tensor>& code2_in,
                  const std::optional<at::Tensor>& absmax2_in, const std::optional<at::Tensor>& offset_in,
                  const std::optional<at::Tensor>& g_idx_in, int64_t N, int64_t blocksize, int64_t blocksize2,
                  const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& a_in,
                  const std::optional<at::Tensor>& b_in, double scale, bool use_pdl,
                  const std::optional<at::Tensor>& y_out, const std::optional<at::Tensor>& s_out,
                  const std::optional<at::Tensor>& col_scale_in) {
  FP_CHECK(x_in.dim() == 2, "x must be 2-D [M, K], found shape ", x_in.sizes());
  FP_CHECK(x_in.is_cuda(), "x must be a CUDA tensor, found device ", x_in.device());
  const int64_t M = x_in.size(0), K = x_in.size(1);
  FP_CHECK(M <= kMaxM, "M (rows of x) must be <= ", kMaxM, ", found ", M);
  FP_CHECK(K >= 1 && N >= 0 && K <= INT32_MAX && N <= INT32_MAX, "K must be >= 1 and K, N fit in int32; found K=",
           K, ", N=", N);
  const int xd = dtype_code(x_in.scalar_type());
  FP_CHECK(xd == 1 || xd == 2, "x must be float16 or bfloat16, found ", x_in.scalar_type());
  const int f = fmt == "nf4" ? 0 : fmt == "int4" ? 1 : fmt == "int8" ? 2 : fmt == "fp8" ? 3 : -1;
  FP_CHECK(f >= 0, "quantization format must be nf4, int4, int8 or fp8, found '", fmt, "'");

  // The packed fields (their shapes as fastpeft.quant.formats.expected_shapes gives them).
  at::Tensor qdata = qdata_in, scales = scales_in, zeros, code, code2, absmax2, offset, g_idx;
  FP_CHECK_DEVICE(qdata, "qdata");
  FP_CHECK_DEVICE(scales, "scales");
  int64_t ldq = 0, ld_scales = 0, ld_zeros = 0;
  int scale_dtype = 0;
  if (f == 0) {  // nf4
    FP_CHECK(K % 2 == 0, "nf4: K must be even for the CUDA kernel (rows start on a byte), found K=", K);
    FP_CHECK(blocksize >= 32 && (blocksize & (blocksize - 1)) == 0,
             "nf4 blocksize must be a power of two >= 32, found ", blocksize);
    const int64_t nb = (N * K + blocksize - 1) / blocksize;
    FP_CHECK(qdata.scalar_type() == at::kByte && qdata.is_contiguous() && qdata.numel() == (N * K + 1) / 2,
             "nf4 qdata must be contiguous uint8 with ", (N * K + 1) / 2, " bytes, found ", qdata.scalar_type(), " ",
             qdata.sizes());
    FP_CHECK(code_in.has_value() && code_in->scalar_type() == at::kFloat && code_in->numel() == 16,
             "nf4 needs its code book: float32 [16]");
    code = code_in->contiguous();
    FP_CHECK_DEVICE(code, "code");
    if (absmax2_in.has_value()) {
      FP_CHECK(scales.scalar_type() == at::kByte && scales.numel() == nb,
               "nf4 double-quantized scales must be uint8 [", nb, "], found ", scales.scalar_type(), " ",
               scales.sizes());
      FP_CHECK(blocksize2 >= 1 && (blocksize2 & (blocksize2 - 1)) == 0,
               "nf4 blocksize2 must be a power of two, found ", blocksize2);
      const int64_t nb2 = (nb + blocksize2 - 1) / blocksize2;
      FP_CHECK(absmax2_in->scalar_type() == at::kFloat && absmax2_in->numel() == nb2,
               "nf4 absmax2 must be float32 [", nb2, "], found ", absmax2_in->scalar_type(), " ", absmax2_in->sizes());
      FP_CHECK(code2_in.has_value() && code2_in->scalar_type() == at::kFloat && code2_in->numel() == 256,
               "nf4 double quantization needs code2: float32 [256]");
      FP_CHECK(offset_in.has_value() && offset_in->scalar_type() == at::kFloat && offset_in->numel() == 1,
               "nf4 double quantization needs offset: a float32 scalar");
      absmax2 = absmax2_in->contiguous();
      code2 = code2_in->contiguous();
      offset = offset_in->reshape({1}).contiguous();
      FP_CHECK_DEVICE(absmax2, "absmax2");
      FP_CHECK_DEVICE(code2, "code2");
      FP_CHECK_DEVICE(offset, "offset");
    } else {
      FP_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == nb, "nf4 scales (absmax) must be float32 [",
               nb, "], found ", scales.scalar_type(), " ", scales.sizes());
    }
    scales = scales.contiguous();
  } else if (f == 1) {  // int4
    FP_CHECK(blocksize >= 1, "int4 group size must be >= 1, found ", blocksize);
    const int64_t G = (K + blocksize - 1) / blocksize;
    FP_CHECK(qdata.scalar_type() == at::kByte && qdata.dim() == 2 && qdata.size(0) == N &&
             qdata.size(1) == (K + 1) / 2, "int4 qdata must be uint8 [N=", N, ", ", (K + 1) / 2, "], found ",
             qdata.scalar_type(), " ", qdata.sizes());
    scale_dtype = scales.scalar_type() == at::kHalf ? 1 : scales.scalar_type() == at::kBFloat16 ? 2 : 0;
    FP_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G &&
             (scales.scalar_type() == at::kFloat || scale_dtype != 0),
             "int4 scales must be float16/bfloat16/float32 [N=", N, ", G=", G, "], found ", scales.scalar_type(), " ",
             scales.sizes());
    FP_CHECK(zeros_in.has_value() && zeros_in->scalar_type() == at::kByte && zeros_in->dim() == 2 &&
             zeros_in->size(0) == N && zeros_in->size(1) == G, "int4 zeros must be uint8 [N=", N, ", G=", G, "]",
             zeros_in.has_value() ? ", found " + text(zeros_in->scalar_type()) + " " + text(zeros_in->sizes())
                                  : std::string(", found none"));
    qdata = unit_inner(qdata);
    scales = unit_inner(scales);
    zeros = unit_inner(*zeros_in);
    FP_CHECK_DEVICE(zeros, "zeros");
    ld_zeros = zeros.stride(0);
    if (g_idx_in.has_value()) {
      FP_CHECK(g_idx_in->dim() == 1 && g_idx_in->size(0) == K &&
               (g_idx_in->scalar_type() == at::kInt || g_idx_in->scalar_type() == at::kLong),
               "int4 g_idx must be int32/int64 [K=", K, "], found ", g_idx_in->scalar_type(), " ", g_idx_in->sizes());
      g_idx = g_idx_in->to(at::kInt).contiguous();
      FP_CHECK_DEVICE(g_idx, "g_idx");
    }
  } else {  // int8, fp8: [N, K] bytes
    const bool ok_dtype = f == 2 ? qdata.scalar_type() == at::kChar
                                 : (qdata.scalar_type() == at::kFloat8_e4m3fn || qdata.scalar_type() == at::kByte);
    FP_CHECK(ok_dtype && qdata.dim() == 2 && qdata.size(0) == N && qdata.size(1) == K, fmt, " qdata must be ",
             f == 2 ? "int8" : "float8_e4m3fn (or its uint8 bits)", " [N=", N, ", K=", K, "], found ",
             qdata.scalar_type(), " ", qdata.sizes());
    qdata = unit_inner(qdata);
    if (f == 2) {
      FP_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == N,
               "int8 scales must be float32 [N=", N, "], found ", scales.scalar_type(), " ", scales.sizes());
      scales = scales.contiguous();
    } else {
      FP_CHECK(blocksize >= 1 && blocksize2 >= 1, "fp8 scale blocks must be positive, found [", blocksize2, ", ",
               blocksize, "]");
      const int64_t gn = (N + blocksize2 - 1) / blocksize2, gk = (K + blocksize - 1) / blocksize;
      FP_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == gn &&
               scales.size(1) == gk, "fp8 scales must be float32 [", gn, ", ", gk, "] for blocks [", blocksize2, ", ",
               blocksize, "], found ", scales.scalar_type(), " ", scales.sizes());
      scales = unit_inner(scales);
    }
  }
  ldq = f == 0 ? 0 : qdata.stride(0);  // bytes: every format's element is one byte
  ld_scales = scales.dim() == 2 ? scales.stride(0) : 0;

  // The adapter (optional) and the epilogue.
  at::Tensor x = unit_inner(x_in), a, b, bias, col_scale;
  int64_t r = 0;
  int ad = 0;
  FP_CHECK(a_in.has_value() == b_in.has_value(), "lora_A and lora_B must both be given or both be None");
  if (a_in.has_value() && a_in->numel() > 0) {
    FP_CHECK(a_in->dim() == 2 && a_in->size(1) == K, "lora_A must be [r, K=", K, "], found ", a_in->sizes());
    r = a_in->size(0);
    FP_CHECK(r <= kMaxR, "rank r must be <= ", kMaxR, ", found ", r);
    FP_CHECK(b_in->dim() == 2 && b_in->size(0) == N && b_in->size(1) == r, "lora_B must be [N=", N, ", r=", r,
             "], found ", b_in->sizes());
    ad = dtype_code(a_in->scalar_type());
    FP_CHECK(a_in->scalar_type() == b_in->scalar_type() && (ad == 0 || ad == xd),
             "lora_A and lora_B must share a dtype, float32 or x's (", x_in.scalar_type(), "); found ",
             a_in->scalar_type(), " and ", b_in->scalar_type());
    a = unit_inner(*a_in);
    b = unit_inner(*b_in);
    FP_CHECK_DEVICE(a, "lora_A");
    FP_CHECK_DEVICE(b, "lora_B");
  }
  Result ep = epilogue(x_in, N, bias_in, col_scale_in);
  if (!std::get<2>(ep).empty()) return ep;
  bias = std::get<0>(ep);
  col_scale = std::get<1>(ep);

  const c10::cuda::CUDAGuard guard(x.device());
  Result out = outputs(x_in, M, N, r, "r", y_out, s_out);
  if (!std::get<2>(out).empty()) return out;
  at::Tensor y = std::get<0>(out), s = std::get<1>(out);
  if (M == 0) return Result{y, s, std::string()};
  if (N == 0) {  // nothing for the GEMV to write; S is still part of the contract
    if (r > 0) s.copy_(at::matmul(x.to(at::kFloat), a.to(at::kFloat).t()));
    return Result{y, s, std::string()};
  }
  const int64_t ldx = M == 1 ? 0 : x.stride(0);  // a single row's stride is meaningless (see lora_gemv)
  const int64_t lda = r == 1 ? 0 : (r > 0 ? a.stride(0) : 0);
  auto ptr = [](const at::Tensor& t) -> const void* { return t.defined() ? t.data_ptr() : nullptr; };
  auto fptr = [](const at::Tensor& t) -> const float* { return t.defined() ? t.data_ptr<float>() : nullptr; };
  const int err = fastpeft_lora_qgemv(
      x.data_ptr(), ldx, ptr(bias), fptr(col_scale), ptr(a), lda, ptr(b), r > 0 ? b.stride(0) : 0,
      r > 0 ? s.data_ptr<float>() : nullptr, r > 0 ? s.stride(0) : 0, y.data_ptr(), y.stride(0), (int)M, (int)N,
      (int)K, (int)r, (float)scale, xd, ad, f, qdata.data_ptr(), ldq, scales.data_ptr(), ld_scales, scale_dtype,
      ptr(zeros), ld_zeros, fptr(code), fptr(code2), fptr(absmax2), fptr(offset),
      g_idx.defined() ? g_idx.data_ptr<int>() : nullptr, (int)blocksize, (int)blocksize2, use_pdl ? 1 : 0,
      c10::cuda::getCurrentCUDAStream().stream());
  FP_CHECK(err == 0, "CUDA launch failed: ", cudaGetErrorString((cudaError_t)err));
  return Result{y, s, std::string()};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpeft CUDA C++ kernels (csrc/)";
  m.def("lora_gemv", &lora_gemv,
        "Fused LoRA decode GEMV, Y = col_scale * (x W^T + scale * (x A^T) B^T) + bias: returns (Y [M,N] x.dtype, "
        "S [M,r] fp32, \"\") or (None, None, error)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("lora_A"),
        pybind11::arg("lora_B"), pybind11::arg("scale"), pybind11::arg("use_pdl"),
        pybind11::arg("out") = pybind11::none(), pybind11::arg("s_out") = pybind11::none(),
        pybind11::arg("col_scale") = pybind11::none());
  m.def("lora_gemv_mixed", &lora_gemv_mixed,
        "Fused LoRA decode GEMV for a mixed batch (each row its own adapter, BGMV): returns (Y [M,N] x.dtype, "
        "S [M,s_cols] fp32, \"\") or (None, None, error)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("lora_As"),
        pybind11::arg("lora_Bs"), pybind11::arg("scales"), pybind11::arg("adapter_ids"), pybind11::arg("row_index"),
        pybind11::arg("s_cols"), pybind11::arg("use_pdl"), pybind11::arg("out") = pybind11::none(),
        pybind11::arg("s_out") = pybind11::none());
  m.def("lora_qgemv", &lora_qgemv,
        "Fused LoRA decode GEMV over a packed quantized weight (nf4/int4/int8/fp8), Y = col_scale * (x deq(W)^T + "
        "scale * (x A^T) B^T) + bias: returns (Y [M,N] x.dtype, S [M,r] fp32, \"\") or (None, None, error)",
        pybind11::arg("x"), pybind11::arg("fmt"), pybind11::arg("qdata"), pybind11::arg("scales"),
        pybind11::arg("zeros"), pybind11::arg("code"), pybind11::arg("code2"), pybind11::arg("absmax2"),
        pybind11::arg("offset"), pybind11::arg("g_idx"), pybind11::arg("N"), pybind11::arg("blocksize"),
        pybind11::arg("blocksize2"), pybind11::arg("bias"), pybind11::arg("lora_A"), pybind11::arg("lora_B"),
        pybind11::arg("scale"), pybind11::arg("use_pdl"), pybind11::arg("out") = pybind11::none(),
        pybind11::arg("s_out") = pybind11::none(), pybind11::arg("col_scale") = pybind11::none());
  // What this build of the binding can do: cuda_backend checks it, so a stale ahead-of-time fastpeft._C
  // (built before a feature) refuses the calls that need the feature instead of failing inside them.
  // "col_scale": DoRA's output column scale (lora_gemv's col_scale); "mixed": lora_gemv_mixed;
  // "qgemv": lora_qgemv (quantized base weights).
  m.attr("FEATURES") = pybind11::make_tuple("col_scale", "mixed", "qgemv");
}
