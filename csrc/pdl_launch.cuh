// One kernel launch, optionally as a Programmatic Dependent Launch: shared by lora_gemv.cu and lora_qgemv.cu.
//
// With use_pdl the kernel is launched as a programmatic dependent of the kernel before it on the stream
// (Hopper, sm_90+): its blocks may start while that kernel still runs, and must execute
// `griddepcontrol.wait` before they read what it writes (the GEMVs stream W first, then wait for S).
// Without it, an ordinary launch behind the previous kernel.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace fastpeft_launch {

template <typename... KArgs, typename... Args>
inline cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, bool use_pdl, cudaStream_t stream,
                          Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = use_pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace fastpeft_launch
