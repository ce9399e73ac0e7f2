// HOST_DEVICE_INLINE marks the ATen-free math of csrc/common/ that the C++ CPU kernels
// and the CUDA kernels share: one definition, compiled by the host compiler and by nvcc.
#pragma once

#if defined(__CUDACC__)
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE_INLINE inline
#endif
