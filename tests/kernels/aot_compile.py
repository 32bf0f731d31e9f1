"""Ahead-of-time compile of every fastpeft Triton kernel for sm_80 / sm_90, no GPU needed.

Run as a script (in a process WITHOUT TRITON_INTERPRET, which replaces kernels by interpreted
Python): `python aot_compile.py {default|all} [variant]` prints one JSON line per compiled (kernel, variant,
config, arch) with shared memory, the use of wgmma, and ptxas -v register/spill counts.
test_aot_compile.py runs it and checks the numbers.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

FLOATS = {"scale", "s_scale", "out_scale", "p_drop", "inv_keep"}
# The mixed-batch tables (kernels/_common.py MIXED): pointer types where a variant does not name them.
MIXED_PTRS = dict(tiles_ptr="i32", order_ptr="i64", ridx_ptr="i64", rank_ptr="i32", off_ptr="i32", adscale_ptr="fp32")


def _variants():
    """(kernel, variant, JITFunction, pointer dtypes, constexprs, configs, dot-rows meta key, pruning rule)."""
    import triton.language as tl

    from fastpeft.kernels import lora_bwd, lora_fwd, lora_quant, lora_shrink, lora_splitk

    bf, f32 = "bf16", "fp32"
    out = []
    # shrink: forward S (x bf16, A fp32, dropout) and backward dS (dY bf16, B^T bf16 as a strided view)
    out.append(("lora_shrink", "fwd_bf16_dropout", lora_shrink.lora_shrink_kernel,
                dict(x_ptr=bf, a_ptr=f32, s_ptr=f32),
                dict(stride_xk=1, stride_ak=1, stride_sr=1, HAS_DROPOUT=True, COMPUTE_DTYPE=tl.float32,
                     INPUT_PRECISION="tf32", BLOCK_R=64),
                lora_shrink.get_shrink_configs(), "BLOCK_M", lora_shrink.prune_shrink_configs))
    out.append(("lora_shrink", "bwd_bf16", lora_shrink.lora_shrink_kernel,
                dict(x_ptr=bf, a_ptr=bf, s_ptr=f32),
                dict(stride_xk=1, stride_ar=1, stride_sr=1, HAS_DROPOUT=False, COMPUTE_DTYPE=tl.bfloat16,
                     INPUT_PRECISION="tf32", BLOCK_R=16),
                lora_shrink.get_shrink_configs(), "BLOCK_M", lora_shrink.prune_shrink_configs))
    out.append(("lora_shrink", "fwd_fp32_ieee_r128", lora_shrink.lora_shrink_kernel,
                dict(x_ptr=f32, a_ptr=f32, s_ptr=f32),
                dict(stride_xk=1, stride_ak=1, stride_sr=1, HAS_DROPOUT=True, COMPUTE_DTYPE=tl.float32,
                     INPUT_PRECISION="ieee", BLOCK_R=128),
                lora_shrink.get_shrink_configs(), None, lora_shrink.prune_shrink_configs))
    # DoRA's constexprs off (kernels/_common.py); the DoRA variants below turn them on
    off = dict(HAS_COL_SCALE=False, X_SCALE=False, DUAL=0)
    mm = dict(off, LORA_DTYPE=tl.float32, LORA_PRECISION="tf32", BLOCK_R=32)
    out.append(("lora_matmul", "fwd_bf16_bias", lora_fwd.lora_matmul_kernel,
                dict(x_ptr=bf, w_ptr=bf, s_ptr=f32, b_ptr=f32, bias_ptr=bf, y_ptr=bf, cs_ptr=f32, z_ptr=bf),
                dict(mm, stride_xk=1, stride_wk=1, stride_sr=1, stride_br=1, stride_yn=1, HAS_W=True, HAS_BIAS=True,
                     OUT_DROPOUT=False, COMPUTE_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32"),
                lora_fwd.get_lora_matmul_configs(), "BLOCK_M", lora_fwd.prune_lora_matmul_configs))
    out.append(("lora_matmul", "bwd_dx_bf16_dropout", lora_fwd.lora_matmul_kernel,
                dict(x_ptr=bf, w_ptr=bf, s_ptr=f32, b_ptr=f32, bias_ptr=f32, y_ptr=bf, cs_ptr=f32, z_ptr=bf),
                dict(mm, stride_xk=1, stride_wn=1, stride_sr=1, stride_bn=1, stride_yn=1, HAS_W=True, HAS_BIAS=False,
                     OUT_DROPOUT=True, COMPUTE_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32"),
                lora_fwd.get_lora_matmul_configs(), "BLOCK_M", lora_fwd.prune_lora_matmul_configs))
    out.append(("lora_matmul", "fwd_fp32_ieee", lora_fwd.lora_matmul_kernel,
                dict(x_ptr=f32, w_ptr=f32, s_ptr=f32, b_ptr=f32, bias_ptr=f32, y_ptr=f32, cs_ptr=f32, z_ptr=f32),
                dict(off, stride_xk=1, stride_wk=1, stride_sr=1, stride_br=1, stride_yn=1, HAS_W=True, HAS_BIAS=True,
                     OUT_DROPOUT=False, COMPUTE_DTYPE=tl.float32, INPUT_PRECISION="ieee", LORA_DTYPE=tl.float32,
                     LORA_PRECISION="ieee", BLOCK_R=32),
                lora_fwd.get_lora_matmul_configs(), None, lora_fwd.prune_lora_matmul_configs))
    fz = dict(WRITE_S=True, HAS_COL_SCALE=False, X_SCALE=False, COMPUTE_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32",
              LORA_PRECISION="tf32")
    out.append(("lora_fused", "fwd_bf16_dropout_r64", lora_fwd.lora_fused_kernel,
                dict(x_ptr=bf, w_ptr=bf, a_ptr=f32, b_ptr=f32, bias_ptr=bf, y_ptr=bf, s_ptr=f32, cs_ptr=f32),
                dict(fz, stride_xk=1, stride_wk=1, stride_ak=1, stride_br=1, stride_yn=1, stride_sr=1, HAS_W=True,
                     HAS_BIAS=True, IN_DROPOUT=True, OUT_DROPOUT=False, SHRINK_DTYPE=tl.float32,
                     SHRINK_PRECISION="tf32", BLOCK_R=64),
                lora_fwd.get_lora_fused_configs(), "BLOCK_M", lora_fwd.prune_lora_fused_configs))
    out.append(("lora_fused", "bwd_dx_bf16_dropout_r16", lora_fwd.lora_fused_kernel,
                dict(x_ptr=bf, w_ptr=bf, a_ptr=f32, b_ptr=f32, bias_ptr=f32, y_ptr=bf, s_ptr=f32, cs_ptr=f32),
                dict(fz, stride_xk=1, stride_wn=1, stride_ar=1, stride_bn=1, stride_yn=1, stride_sr=1, HAS_W=True,
                     HAS_BIAS=False, IN_DROPOUT=False, OUT_DROPOUT=True, SHRINK_DTYPE=tl.float32,
                     SHRINK_PRECISION="tf32", BLOCK_R=16),
                lora_fwd.get_lora_fused_configs(), "BLOCK_M", lora_fwd.prune_lora_fused_configs))
    out.append(("lora_fused", "fwd_bf16_adapters_r128", lora_fwd.lora_fused_kernel,
                dict(x_ptr=bf, w_ptr=bf, a_ptr=bf, b_ptr=bf, bias_ptr=bf, y_ptr=bf, s_ptr=f32, cs_ptr=f32),
                dict(fz, stride_xk=1, stride_wk=1, stride_ak=1, stride_br=1, stride_yn=1, stride_sr=1, HAS_W=True,
                     HAS_BIAS=False, IN_DROPOUT=False, OUT_DROPOUT=False, SHRINK_DTYPE=tl.bfloat16,
                     SHRINK_PRECISION="tf32", BLOCK_R=128),
                lora_fwd.get_lora_fused_configs(), "BLOCK_M", lora_fwd.prune_lora_fused_configs))
    out.append(("lora_fused", "fwd_fp32_ieee_r64", lora_fwd.lora_fused_kernel,
                dict(x_ptr=f32, w_ptr=f32, a_ptr=f32, b_ptr=f32, bias_ptr=f32, y_ptr=f32, s_ptr=f32, cs_ptr=f32),
                dict(WRITE_S=True, HAS_COL_SCALE=False, X_SCALE=False, COMPUTE_DTYPE=tl.float32, INPUT_PRECISION="ieee",
                     LORA_PRECISION="ieee",
                     stride_xk=1, stride_wk=1, stride_ak=1, stride_br=1, stride_yn=1, stride_sr=1, HAS_W=True,
                     HAS_BIAS=True, IN_DROPOUT=True, OUT_DROPOUT=False, SHRINK_DTYPE=tl.float32,
                     SHRINK_PRECISION="ieee", BLOCK_R=64),  # auto runs r > 64 exact fp32 split
                lora_fwd.get_lora_fused_configs(), None, lora_fwd.prune_lora_fused_configs))
    wg = dict(COMPUTE_DTYPE=tl.float32, INPUT_PRECISION="tf32")
    out.append(("lora_wgrad", "dA_bf16_dropout", lora_bwd.lora_wgrad_kernel,
                dict(lhs_ptr=f32, rhs_ptr=bf, out_ptr=f32),
                dict(wg, stride_lhs_p=1, stride_rhs_q=1, stride_oq=1, HAS_DROPOUT=True, ATOMIC=False),
                lora_bwd.get_wgrad_configs(), "BLOCK_P", lora_bwd.prune_wgrad_configs))
    out.append(("lora_wgrad", "dB_bf16_atomic", lora_bwd.lora_wgrad_kernel,
                dict(lhs_ptr=bf, rhs_ptr=f32, out_ptr=f32),
                dict(wg, stride_lhs_p=1, stride_rhs_q=1, stride_oq=1, HAS_DROPOUT=False, ATOMIC=True),
                lora_bwd.get_wgrad_configs(), "BLOCK_P", lora_bwd.prune_wgrad_configs))
    out.append(("lora_wgrad", "dA_fp32_ieee_dropout", lora_bwd.lora_wgrad_kernel,
                dict(lhs_ptr=f32, rhs_ptr=f32, out_ptr=f32),
                dict(COMPUTE_DTYPE=tl.float32, INPUT_PRECISION="ieee", stride_lhs_p=1, stride_rhs_q=1, stride_oq=1,
                     HAS_DROPOUT=True, ATOMIC=False),
                lora_bwd.get_wgrad_configs(), None, lora_bwd.prune_wgrad_configs))
    # quantized base weight (kernels/lora_quant.py): one kernel, FORMAT / TRANS_W constexprs
    u8, i8, i32 = "u8", "i8", "i32"
    nf4, int4, int8 = (lora_quant.FORMAT_IDS[f] for f in ("nf4", "int4", "int8"))
    qcfg, qprune = lora_quant.get_lora_quant_configs(), lora_quant.prune_lora_quant_configs
    qfwd = dict(off, stride_xk=1, stride_sr=1, stride_br=1, stride_yn=1, INDEX_64=False, PACKED=True, TRANS_W=True,
                OUT_DROPOUT=False, LORA_PRECISION="tf32", BLOCK_R=32)
    qbwd = dict(off, stride_xk=1, stride_sr=1, stride_bp=1, stride_yn=1, INDEX_64=False, PACKED=True, TRANS_W=False,
                HAS_BIAS=False, OUT_DROPOUT=True, LORA_PRECISION="tf32", BLOCK_R=32)

    def qptrs(x, q, sc, y, z=f32, g=i32):
        return dict(x_ptr=x, qdata_ptr=q, scales_ptr=sc, zeros_ptr=z, code_ptr=f32, absmax2_ptr=f32, code2_ptr=f32,
                    offset_ptr=f32, gidx_ptr=g, s_ptr=f32, b_ptr=f32, bias_ptr=y, y_ptr=y, cs_ptr=f32, zd_ptr=y)

    out.append(("lora_quant", "fwd_nf4_dq_bf16_bias", lora_quant.lora_quant_kernel, qptrs(bf, u8, u8, bf),
                dict(qfwd, FORMAT=nf4, DOUBLE_QUANT=True, HAS_GIDX=False, HAS_BIAS=True, COMPUTE_DTYPE=tl.bfloat16,
                     INPUT_PRECISION="tf32", SCALE_K=64), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "bwd_dx_int4_gidx_bf16_dropout", lora_quant.lora_quant_kernel,
                qptrs(bf, u8, "fp16", bf, z=u8),
                dict(qbwd, stride_sn=1, FORMAT=int4, DOUBLE_QUANT=False, HAS_GIDX=True, COMPUTE_DTYPE=tl.bfloat16,
                     INPUT_PRECISION="tf32"), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "fwd_int8_fp16_decode", lora_quant.lora_quant_kernel, qptrs("fp16", i8, f32, "fp16"),
                dict(qfwd, FORMAT=int8, PACKED=False, DOUBLE_QUANT=False, HAS_GIDX=False, HAS_BIAS=False,
                     COMPUTE_DTYPE=tl.float16,
                     INPUT_PRECISION="tf32"), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "fwd_nf4_bf16_decode", lora_quant.lora_quant_kernel, qptrs(bf, u8, f32, bf),
                dict(qfwd, FORMAT=nf4, DOUBLE_QUANT=False, HAS_GIDX=False, HAS_BIAS=False, COMPUTE_DTYPE=tl.bfloat16,
                     INPUT_PRECISION="tf32"), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "fwd_int4_fp16", lora_quant.lora_quant_kernel, qptrs("fp16", u8, "fp16", "fp16", z=u8),
                dict(qfwd, stride_sn=1, FORMAT=int4, DOUBLE_QUANT=False, HAS_GIDX=False, HAS_BIAS=True,
                     COMPUTE_DTYPE=tl.float16, INPUT_PRECISION="tf32", SCALE_K=128), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "bwd_dx_nf4_dq_bf16_dropout", lora_quant.lora_quant_kernel, qptrs(bf, u8, u8, bf),
                dict(qbwd, FORMAT=nf4, DOUBLE_QUANT=True, HAS_GIDX=False, COMPUTE_DTYPE=tl.bfloat16,
                     INPUT_PRECISION="tf32"), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "fwd_int8_fp32_ieee", lora_quant.lora_quant_kernel, qptrs(f32, i8, f32, f32),
                dict(qfwd, FORMAT=int8, PACKED=False, DOUBLE_QUANT=False, HAS_GIDX=False, HAS_BIAS=True,
                     COMPUTE_DTYPE=tl.float32,
                     INPUT_PRECISION="ieee", LORA_PRECISION="ieee"), qcfg, None, qprune))
    # fp8 (e4m3fn codes as uint8 bits, decoded in registers; fp32 block / channel scales)
    fp8 = lora_quant.FORMAT_IDS["fp8"]
    fp8c = dict(PACKED=False, DOUBLE_QUANT=False, HAS_GIDX=False, COMPUTE_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32")
    out.append(("lora_quant", "fwd_fp8_bf16_bias", lora_quant.lora_quant_kernel, qptrs(bf, u8, f32, bf),
                dict(qfwd, **fp8c, FORMAT=fp8, HAS_BIAS=True, SCALE_K=128), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "bwd_dx_fp8_bf16_dropout", lora_quant.lora_quant_kernel, qptrs(bf, u8, f32, bf),
                dict(qbwd, **fp8c, FORMAT=fp8, SCALE_K=128), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "fwd_fp8_bf16_decode", lora_quant.lora_quant_kernel, qptrs(bf, u8, f32, bf),
                dict(qfwd, **fp8c, FORMAT=fp8, HAS_BIAS=False), qcfg, "BLOCK_M", qprune))
    # fp8 W8A8 (FP8_DOT): x quantized to e4m3 in registers, fp8 x fp8 dots (sm_90: wgmma on e4m3 operands)
    out.append(("lora_quant", "fwd_fp8_w8a8_bf16_bias", lora_quant.lora_quant_kernel, qptrs(bf, u8, f32, bf),
                dict(qfwd, **fp8c, FORMAT=fp8, HAS_BIAS=True, SCALE_K=128, FP8_DOT=True), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "fwd_fp8_e4m3cvt_bf16_decode", lora_quant.lora_quant_kernel, qptrs(bf, u8, f32, bf),
                dict(qfwd, **fp8c, FORMAT=fp8, HAS_BIAS=False, SCALE_K=128, FP8_CVT=True), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "fwd_fp8_w8a8_bf16_decode", lora_quant.lora_quant_kernel, qptrs(bf, u8, f32, bf),
                dict(qfwd, **fp8c, FORMAT=fp8, HAS_BIAS=False, SCALE_K=128, FP8_DOT=True, SPLIT_K=4), qcfg, "BLOCK_M",
                qprune))
    # nf4 with odd K: rows start mid-byte, each element reads its own byte (no packed tile)
    out.append(("lora_quant", "fwd_nf4_oddk_bf16", lora_quant.lora_quant_kernel, qptrs(bf, u8, f32, bf),
                dict(qfwd, FORMAT=nf4, PACKED=False, DOUBLE_QUANT=False, HAS_GIDX=False, HAS_BIAS=False,
                     COMPUTE_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32"), qcfg, "BLOCK_M", qprune))
    # DoRA (kernels/_common.py): the column scale in the epilogue (HAS_COL_SCALE), on dY's tile (X_SCALE),
    # and with dropout the two accumulators sharing each W tile (DUAL 1: forward, writes Y and Z_d; 2: dX)
    mmp = dict(x_ptr=bf, w_ptr=bf, s_ptr=f32, b_ptr=f32, bias_ptr=bf, y_ptr=bf, cs_ptr=f32, z_ptr=bf)
    mmf = dict(mm, stride_xk=1, stride_wk=1, stride_sr=1, stride_br=1, stride_yn=1, stride_zn=1, HAS_W=True,
               HAS_BIAS=True, OUT_DROPOUT=False, COMPUTE_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32")
    mmb = dict(mm, stride_xk=1, stride_wn=1, stride_sr=1, stride_bn=1, stride_yn=1, stride_zn=1, HAS_W=True,
               HAS_BIAS=False, OUT_DROPOUT=False, COMPUTE_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32")
    mcfg, mprune = lora_fwd.get_lora_matmul_configs(), lora_fwd.prune_lora_matmul_configs
    out.append(("lora_matmul", "fwd_dora_bf16_dropout", lora_fwd.lora_matmul_kernel, mmp,
                dict(mmf, HAS_COL_SCALE=True, DUAL=1), mcfg, "BLOCK_M", mprune))
    out.append(("lora_matmul", "fwd_dora_bf16", lora_fwd.lora_matmul_kernel, mmp,
                dict(mmf, HAS_COL_SCALE=True), mcfg, "BLOCK_M", mprune))
    out.append(("lora_matmul", "bwd_dx_dora_bf16_dropout", lora_fwd.lora_matmul_kernel, mmp,
                dict(mmb, DUAL=2), mcfg, "BLOCK_M", mprune))
    out.append(("lora_matmul", "bwd_dx_dora_bf16", lora_fwd.lora_matmul_kernel, mmp,
                dict(mmb, X_SCALE=True), mcfg, "BLOCK_M", mprune))
    out.append(("lora_matmul", "fwd_dora_fp32_ieee_dropout", lora_fwd.lora_matmul_kernel,
                {k: f32 for k in mmp},
                dict(mmf, HAS_COL_SCALE=True, DUAL=1, COMPUTE_DTYPE=tl.float32, INPUT_PRECISION="ieee",
                     LORA_PRECISION="ieee"), mcfg, None, mprune))
    out.append(("lora_matmul", "bwd_dx_dora_fp16_dropout", lora_fwd.lora_matmul_kernel,
                dict(mmp, x_ptr="fp16", w_ptr="fp16", bias_ptr="fp16", y_ptr="fp16", z_ptr="fp16"),
                dict(mmb, DUAL=2, COMPUTE_DTYPE=tl.float16), mcfg, "BLOCK_M", mprune))
    fzp = dict(x_ptr=bf, w_ptr=bf, a_ptr=f32, b_ptr=f32, bias_ptr=bf, y_ptr=bf, s_ptr=f32, cs_ptr=f32)
    out.append(("lora_fused", "fwd_dora_bf16_r64", lora_fwd.lora_fused_kernel, fzp,
                dict(fz, stride_xk=1, stride_wk=1, stride_ak=1, stride_br=1, stride_yn=1, stride_sr=1, HAS_W=True,
                     HAS_BIAS=True, IN_DROPOUT=False, OUT_DROPOUT=False, SHRINK_DTYPE=tl.float32,
                     SHRINK_PRECISION="tf32", BLOCK_R=64, HAS_COL_SCALE=True),
                lora_fwd.get_lora_fused_configs(), "BLOCK_M", lora_fwd.prune_lora_fused_configs))
    out.append(("lora_fused", "bwd_dx_dora_bf16_r64", lora_fwd.lora_fused_kernel, fzp,
                dict(fz, stride_xk=1, stride_wn=1, stride_ar=1, stride_bn=1, stride_yn=1, stride_sr=1, HAS_W=True,
                     HAS_BIAS=False, IN_DROPOUT=False, OUT_DROPOUT=False, SHRINK_DTYPE=tl.float32,
                     SHRINK_PRECISION="tf32", BLOCK_R=64, X_SCALE=True),
                lora_fwd.get_lora_fused_configs(), "BLOCK_M", lora_fwd.prune_lora_fused_configs))
    out.append(("lora_quant", "fwd_dora_nf4_dq_bf16_dropout", lora_quant.lora_quant_kernel, qptrs(bf, u8, u8, bf),
                dict(qfwd, stride_zdn=1, FORMAT=nf4, DOUBLE_QUANT=True, HAS_GIDX=False, HAS_BIAS=True,
                     HAS_COL_SCALE=True, DUAL=1, COMPUTE_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32"),
                qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "fwd_dora_int4_fp16", lora_quant.lora_quant_kernel,
                qptrs("fp16", u8, "fp16", "fp16", z=u8),
                dict(qfwd, stride_sn=1, FORMAT=int4, DOUBLE_QUANT=False, HAS_GIDX=False, HAS_BIAS=True,
                     HAS_COL_SCALE=True, COMPUTE_DTYPE=tl.float16, INPUT_PRECISION="tf32"), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "fwd_dora_int8_bf16_dropout_decode", lora_quant.lora_quant_kernel,
                qptrs(bf, i8, f32, bf),
                dict(qfwd, stride_zdn=1, FORMAT=int8, PACKED=False, DOUBLE_QUANT=False, HAS_GIDX=False, HAS_BIAS=False,
                     HAS_COL_SCALE=True, DUAL=1, COMPUTE_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32"),
                qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "fwd_dora_int8_fp32_ieee_dropout", lora_quant.lora_quant_kernel, qptrs(f32, i8, f32, f32),
                dict(qfwd, stride_zdn=1, FORMAT=int8, PACKED=False, DOUBLE_QUANT=False, HAS_GIDX=False, HAS_BIAS=True,
                     HAS_COL_SCALE=True, DUAL=1, COMPUTE_DTYPE=tl.float32, INPUT_PRECISION="ieee",
                     LORA_PRECISION="ieee"), qcfg, None, qprune))
    out.append(("lora_quant", "bwd_dx_dora_nf4_bf16_dropout", lora_quant.lora_quant_kernel, qptrs(bf, u8, f32, bf),
                dict(qbwd, stride_zdn=1, OUT_DROPOUT=False, DUAL=2, FORMAT=nf4, DOUBLE_QUANT=False, HAS_GIDX=False,
                     COMPUTE_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32"), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "bwd_dx_dora_int4_gidx_bf16", lora_quant.lora_quant_kernel,
                qptrs(bf, u8, "fp16", bf, z=u8),
                dict(qbwd, stride_sn=1, OUT_DROPOUT=False, X_SCALE=True, FORMAT=int4, DOUBLE_QUANT=False,
                     HAS_GIDX=True, COMPUTE_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32"), qcfg, "BLOCK_M", qprune))
    # Mixed batches (kernels/lora_mixed.py): segment tiles (one adapter per row tile, rows gathered through
    # the plan's order) in the shrink, the dense and packed GEMMs, dX and the dA reduction; decode tiles
    # (each row its own adapter's B in the LoRA step) in both GEMMs
    seg, gat = dict(MIXED=1, AD_SCALE=True), dict(MIXED=2, AD_SCALE=True)
    out.append(("lora_shrink", "fwd_mixed_shrink_bf16", lora_shrink.lora_shrink_kernel,
                dict(x_ptr=bf, a_ptr=bf, s_ptr=f32),
                dict(stride_xk=1, stride_ak=1, stride_sr=1, HAS_DROPOUT=False, MIXED=1, AD_SCALE=False,
                     COMPUTE_DTYPE=tl.bfloat16, INPUT_PRECISION="tf32", BLOCK_R=64),
                lora_shrink.get_shrink_configs(), "BLOCK_M", lora_shrink.prune_shrink_configs))
    out.append(("lora_matmul", "fwd_mixed_segment_bf16", lora_fwd.lora_matmul_kernel, mmp,
                dict(mmf, **seg), mcfg, "BLOCK_M", mprune))
    out.append(("lora_matmul", "fwd_mixed_gather_bf16_decode", lora_fwd.lora_matmul_kernel, mmp,
                dict(mmf, **gat), mcfg, "BLOCK_M", mprune))
    out.append(("lora_matmul", "bwd_dx_mixed_segment_bf16", lora_fwd.lora_matmul_kernel, mmp,
                dict(mmb, MIXED=1, AD_SCALE=False), mcfg, "BLOCK_M", mprune))
    out.append(("lora_quant", "fwd_mixed_segment_nf4_bf16", lora_quant.lora_quant_kernel, qptrs(bf, u8, f32, bf),
                dict(qfwd, FORMAT=nf4, DOUBLE_QUANT=False, HAS_GIDX=False, HAS_BIAS=True, COMPUTE_DTYPE=tl.bfloat16,
                     INPUT_PRECISION="tf32", **seg), qcfg, "BLOCK_M", qprune))
    # DoRA slots in a mixed batch: each row's g from a table in the epilogue (_common.col_scale_rows)
    out.append(("lora_matmul", "fwd_mixed_gather_slotscale_bf16_decode", lora_fwd.lora_matmul_kernel, mmp,
                dict(mmf, **gat, HAS_COL_SCALE=True), mcfg, "BLOCK_M", mprune))
    out.append(("lora_quant", "fwd_mixed_segment_slotscale_nf4_bf16", lora_quant.lora_quant_kernel,
                qptrs(bf, u8, f32, bf),
                dict(qfwd, FORMAT=nf4, DOUBLE_QUANT=False, HAS_GIDX=False, HAS_BIAS=True, COMPUTE_DTYPE=tl.bfloat16,
                     INPUT_PRECISION="tf32", HAS_COL_SCALE=True, SCALE_K=64, **seg), qcfg, "BLOCK_M", qprune))
    out.append(("lora_quant", "fwd_mixed_gather_nf4_bf16_decode", lora_quant.lora_quant_kernel,
                qptrs(bf, u8, f32, bf),
                dict(qfwd, FORMAT=nf4, DOUBLE_QUANT=False, HAS_GIDX=False, HAS_BIAS=False, COMPUTE_DTYPE=tl.bfloat16,
                     INPUT_PRECISION="tf32", **gat), qcfg, "BLOCK_M", qprune))
    out.append(("lora_wgrad", "dA_mixed_segment_bf16", lora_bwd.lora_wgrad_kernel,
                dict(lhs_ptr=f32, rhs_ptr=bf, out_ptr=f32),
                dict(wg, stride_lhs_p=1, stride_rhs_q=1, stride_oq=1, HAS_DROPOUT=False, ATOMIC=False, MIXED=1,
                     AD_SCALE=False), lora_bwd.get_wgrad_configs(), "BLOCK_P", lora_bwd.prune_wgrad_configs))
    # split-K decode (kernels/lora_splitk.py): the GEMMs' partial-sum programs and the finish kernel (plain,
    # DoRA's column scale and bias; a mixed batch's gathered rows)
    out.append(("lora_quant", "fwd_nf4_bf16_split_decode", lora_quant.lora_quant_kernel, qptrs(bf, u8, f32, f32),
                dict(qfwd, FORMAT=nf4, DOUBLE_QUANT=True, HAS_GIDX=False, HAS_BIAS=False, COMPUTE_DTYPE=tl.bfloat16,
                     INPUT_PRECISION="tf32", SPLIT_K=4, SCALE_K=64), qcfg, "BLOCK_M", qprune))
    out.append(("lora_matmul", "fwd_bf16_split_decode", lora_fwd.lora_matmul_kernel,
                dict(mmp, y_ptr=f32), dict(mmf, HAS_BIAS=False, SPLIT_K=4), mcfg, "BLOCK_M", mprune))
    fin = [lora_splitk.get_finish_config()]
    finp = dict(part_ptr=f32, s_ptr=f32, b_ptr=bf, bias_ptr=bf, y_ptr=bf, cs_ptr=f32, ridx_ptr="i64")
    out.append(("lora_splitk", "finish_bf16_colscale_bias_decode", lora_splitk.lora_splitk_finish_kernel, finp,
                dict(stride_sr=1, stride_br=1, stride_yn=1, SPLIT_K=4, HAS_BIAS=True, HAS_COL_SCALE=True, GATHER=False,
                     AD_SCALE=False, LORA_PRECISION="tf32", BLOCK_R=lora_splitk.FINISH_BLOCK_R), fin, "BLOCK_M", lambda c, named, **kw: c))
    out.append(("lora_splitk", "finish_bf16_mixed_gather_decode", lora_splitk.lora_splitk_finish_kernel, finp,
                dict(stride_sr=1, stride_br=1, stride_yn=1, SPLIT_K=8, HAS_BIAS=False, HAS_COL_SCALE=False,
                     GATHER=True, AD_SCALE=True, LORA_PRECISION="tf32", BLOCK_R=lora_splitk.FINISH_BLOCK_R), fin, None,
                lambda c, named, **kw: c))
    # every other variant of a kernel that takes mixed batches: none
    return [(k, v, fn, ptrs, dict(dict(MIXED=0, AD_SCALE=False) if "MIXED" in fn.arg_names else {}, **consts), cfgs,
             rows, prune) for k, v, fn, ptrs, consts, cfgs, rows, prune in out]


def _ptxas_v(ptx: str, arch: str, cap: int):
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([get_ptxas(cap).path, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}: {r.stderr[-2000:]}")
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    return int(m.group(1)), int(m.group(2)), int(regs.group(1)) if regs else -1


def compile_one(fn, ptrs, consts, cfg, cap):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(consts, **cfg.kwargs)
    # constexprs with a default (SPLIT_K, SCALE_K) that the variant does not set: their default, as a launch
    # that omits them gets (ASTSource would otherwise take them for runtime i32 arguments)
    consts.update({p.name: p.default for p in fn.params
                   if p.is_constexpr and p.has_default and p.name not in consts})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (ptrs.get(name) or MIXED_PTRS[name])
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
            if name.startswith("stride") or name == "rows_per_split":
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


# Default subset (CI time budget): one variant per kernel, forward + backward-side flags mixed.
DEFAULT_VARIANTS = ("fwd_bf16_dropout", "bwd_dx_bf16_dropout", "fwd_bf16_dropout_r64", "dA_bf16_dropout",
                    "fwd_nf4_dq_bf16_bias", "bwd_dx_int4_gidx_bf16_dropout", "fwd_int8_fp16_decode",
                    "fwd_fp8_bf16_bias",
                    # DoRA with dropout: the two-accumulator forward (dense, packed) and dX GEMMs
                    "fwd_dora_bf16_dropout", "fwd_dora_nf4_dq_bf16_dropout", "bwd_dx_dora_bf16_dropout",
                    # mixed batches: segment tiles in the dense and packed GEMMs, decode tiles (gathered B)
                    "fwd_mixed_segment_bf16", "fwd_mixed_segment_nf4_bf16", "fwd_mixed_gather_bf16_decode",
                    # split-K decode: the packed GEMM's partial sums and the finish kernel
                    "fwd_nf4_bf16_split_decode", "finish_bf16_colscale_bias_decode",
                    # fp8 W8A8 on e4m3 tensor cores (sm_90 only)
                    "fwd_fp8_w8a8_bf16_bias")


TORCH = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "u8": "uint8", "i8": "int8", "i32": "int32",
         "i64": "int64"}


def tunable(configs, prune, ptrs, consts, small_m=False, m_bucket=None):
    """The configs the autotuner may run for these dtypes/flags: the pruning rule applied to a
    large shape (M = 4096, or 64 for the small-M fused kernel, or m_bucket; N = K = 4096; r = 256
    for dA/dB; P = Q = 4096 for the quant GEMM)."""
    import torch

    named = {name: torch.empty(0, dtype=getattr(torch, TORCH[d])) for name, d in ptrs.items()}
    named.update(M_BUCKET=m_bucket or (64 if small_m else 4096), N=4096, K=4096, P=consts.get("BLOCK_R", 64), Q=4096)
    if "TRANS_W" in consts:  # quant GEMM: P is the output width (N or K), not r
        named.update(P=4096)
    if "ATOMIC" in consts:  # wgrad: P = r (dA) or N (dB)
        named.update(P=256 if consts.get("HAS_DROPOUT") else 4096, Q=4096 if consts.get("HAS_DROPOUT") else 256)
    return prune(configs, named, **consts)


def representative(configs, dot_rows_key):
    """Default subset: the config with the largest dot tile (what big shapes pick on H100)."""
    key = (lambda c: (c.kwargs[dot_rows_key], sum(v for k, v in c.kwargs.items() if k.startswith("BLOCK")))) \
        if dot_rows_key else (lambda c: sum(v for k, v in c.kwargs.items() if k.startswith("BLOCK")))
    return [max(configs, key=key)]


def arches(variant: str) -> tuple:
    """The compute capabilities a variant compiles for: fp8 W8A8 and the e4m3 type's conversion need sm_89+
    (Triton has no e4m3 type on sm_80, where the launchers use the integer decode and fastpeft.ops the
    dequantized path), the rest sm_80 and sm_90."""
    return (90,) if "_w8a8_" in variant or "_e4m3cvt_" in variant else (80, 90)


def main(mode: str, only: str = ""):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET: the interpreter replaces kernels by Python")
    for kname, variant, fn, ptrs, consts, configs, rows_key, prune in _variants():
        if (mode != "all" and variant not in DEFAULT_VARIANTS) or (only and variant != only):
            continue
        configs = tunable(configs, prune, ptrs, consts, small_m=kname == "lora_fused",
                          m_bucket=16 if variant.endswith("_decode") else None)
        chosen = configs if mode == "all" else representative(configs, rows_key)
        for cfg in chosen:
            for cap in arches(variant):
                arch = "sm_90a" if cap == 90 else f"sm_{cap}"
                c = compile_one(fn, ptrs, consts, cfg, cap)
                ptx = c.asm["ptx"]
                target = re.search(r"\.target (\S+)", ptx).group(1)
                stores, loads, regs = _ptxas_v(ptx, target, cap)
                print(json.dumps(dict(kernel=kname, variant=variant, config=str(cfg), cap=cap, target=target,
                                      arch=arch, shared=c.metadata.shared, wgmma="wgmma" in ptx,
                                      mma=("mma.sync" in ptx) or ("wgmma" in ptx),
                                      fp8_mma=bool(re.search(r"(wgmma|mma)\S*e4m3", ptx)),
                                      dot_rows=cfg.kwargs[rows_key] if rows_key else None,
                                      spill_stores=stores, spill_loads=loads, regs=regs)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "default", sys.argv[2] if len(sys.argv) > 2 else "")
