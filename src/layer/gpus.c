/* gpus.c — how many GPUs this process can use (layer.h): what MOE_BACKEND_AUTO resolves by,
 * and what a device ordinal and NCCL's one GPU per rank are checked against. */
#include "layer.h"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

int moe_gpu_count(void)
{
    int ndev = 0;
#ifdef MOE_HAVE_CUDA
    if (cudaGetDeviceCount(&ndev) != cudaSuccess) {
        /* no driver or no device: none usable, and the error must not linger for the next
         * CUDA call to report */
        cudaGetLastError();
        ndev = 0;
    }
#endif
    return ndev;
}
