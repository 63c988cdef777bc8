/* cuda_baselines.c — cuBLAS baselines for `moe-ep bench` (see cuda_baselines.h). */
#include "cuda_baselines.h"

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#define BL_CUDA(call, what)                                                                  \
    do {                                                                                     \
        cudaError_t bl_e_ = (call);                                                          \
        if (bl_e_ != cudaSuccess) {                                                          \
            st = moe_fail(err, MOE_ERR_CUDA, "baselines: %s: %s", (what), cudaGetErrorString(bl_e_)); \
            goto done;                                                                       \
        }                                                                                    \
    } while (0)
#define BL_BLAS(call, what)                                                                  \
    do {                                                                                     \
        cublasStatus_t bl_s_ = (call);                                                       \
        if (bl_s_ != CUBLAS_STATUS_SUCCESS) {                                                \
            st = moe_fail(err, MOE_ERR_CUDA, "baselines: %s: cuBLAS status %d", (what), (int)bl_s_); \
            goto done;                                                                       \
        }                                                                                    \
    } while (0)

static cudaDataType_t cuda_type(moe_dtype dt)
{
    return dt == MOE_DTYPE_BF16 ? CUDA_R_16BF : dt == MOE_DTYPE_F16 ? CUDA_R_16F : CUDA_R_32F;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Row-major C[m,N] = A[m,K] @ B[N,K]^T is column-major C^T = B^T(op T) A^T: m'=N, n'=m, k=K. */
static cublasStatus_t gemm_nt(cublasHandle_t h, cudaDataType_t t, int m, int N, int K,
                              const void *A, const void *B, void *C)
{
    const float one = 1.0f, zero = 0.0f;
    return cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, m, K, &one, B, t, K, A, t, K, &zero, C, t, N,
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

moe_status moe_cuda_baselines(moe_dtype dt, int El, int H, int I, const void *w13, const void *w2,
                              const int32_t *counts, int warmup, int iters,
                              moe_baseline_times *out, moe_error *err)
{
    moe_status st = MOE_OK;
    cublasHandle_t h = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    void *X = NULL, *A1 = NULL, *Y = NULL, *A2 = NULL;
    void **dptr = NULL;
    double *t = NULL;
    const cudaDataType_t ct = cuda_type(dt);
    const size_t es = dt == MOE_DTYPE_F32 ? 4 : 2;
    long M = 0;
    for (int e = 0; e < El; e++) M += counts[e];
    memset(out, 0, sizeof *out);
    if (M == 0) return MOE_OK;
    int ng = 0;
    int *gm = calloc((size_t)El, sizeof(int));
    t = calloc((size_t)iters, sizeof(double));
    if (!gm || !t) { st = moe_fail(err, MOE_ERR_NOMEM, "baselines"); goto done; }
    BL_BLAS(cublasCreate(&h), "cublasCreate");
    BL_BLAS(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    BL_CUDA(cudaMalloc(&X, (size_t)M * H * es), "cudaMalloc");   /* permuted input [M,H] */
    BL_CUDA(cudaMalloc(&A1, (size_t)M * 2 * I * es), "cudaMalloc"); /* GEMM1 out [M,2I] */
    BL_CUDA(cudaMalloc(&A2, (size_t)M * I * es), "cudaMalloc");  /* activation [M,I] */
    BL_CUDA(cudaMalloc(&Y, (size_t)M * H * es), "cudaMalloc");   /* GEMM2 out [M,H] */
    /* inputs: copies of weight bytes (random-valued, never zeros, which would run faster) */
    {
        size_t wb = (size_t)El * 2 * I * H * es;
        for (size_t off = 0; off < (size_t)M * H * es; off += wb)
            BL_CUDA(cudaMemcpy((char *)X + off, w13, MOE_MIN(wb, (size_t)M * H * es - off), cudaMemcpyDeviceToDevice), "cudaMemcpy");
        size_t w2b = (size_t)El * H * I * es;
        for (size_t off = 0; off < (size_t)M * I * es; off += w2b)
            BL_CUDA(cudaMemcpy((char *)A2 + off, w2, MOE_MIN(w2b, (size_t)M * I * es - off), cudaMemcpyDeviceToDevice), "cudaMemcpy");
    }
    BL_CUDA(cudaEventCreate(&e0), "cudaEventCreate");
    BL_CUDA(cudaEventCreate(&e1), "cudaEventCreate");

    /* grouped: pointer arrays on the device, one group per non-empty expert */
    for (int e = 0; e < El; e++) ng += counts[e] > 0;
    BL_CUDA(cudaMalloc((void **)&dptr, sizeof(void *) * 6 * (size_t)(ng ? ng : 1)), "cudaMalloc");
    {
        void **hp = malloc(sizeof(void *) * 6 * (size_t)(ng ? ng : 1));
        if (!hp) { st = moe_fail(err, MOE_ERR_NOMEM, "baselines"); goto done; }
        long r0 = 0;
        for (int g = 0, e = 0; e < El && g < ng; e++) {
            if (counts[e] == 0) continue;
            hp[0 * ng + g] = (char *)w13 + (size_t)e * 2 * I * H * es; /* GEMM1 "A" = W13_e */
            hp[1 * ng + g] = (char *)X + (size_t)r0 * H * es;
            hp[2 * ng + g] = (char *)A1 + (size_t)r0 * 2 * I * es;
            hp[3 * ng + g] = (char *)w2 + (size_t)e * H * I * es;
            hp[4 * ng + g] = (char *)A2 + (size_t)r0 * I * es;
            hp[5 * ng + g] = (char *)Y + (size_t)r0 * H * es;
            gm[g] = counts[e];
            r0 += counts[e];
            g++;
        }
        cudaError_t ce = cudaMemcpy(dptr, hp, sizeof(void *) * 6 * (size_t)ng, cudaMemcpyHostToDevice);
        free(hp);
        BL_CUDA(ce, "cudaMemcpy");
    }

    for (int which = 0; which < 3; which++) {
        for (int it = 0; it < warmup + iters; it++) {
            BL_CUDA(cudaEventRecord(e0, 0), "cudaEventRecord");
            if (which == 0) { /* dense: all M rows against expert 0's weights */
                BL_BLAS(gemm_nt(h, ct, (int)M, 2 * I, H, X, w13, A1), "dense GEMM1");
                BL_BLAS(gemm_nt(h, ct, (int)M, H, I, A2, w2, Y), "dense GEMM2");
            } else if (which == 1) { /* per-expert loop */
                long r0 = 0;
                for (int e = 0; e < El; e++) {
                    int m = counts[e];
                    if (!m) continue;
                    BL_BLAS(gemm_nt(h, ct, m, 2 * I, H, (char *)X + (size_t)r0 * H * es,
                                    (const char *)w13 + (size_t)e * 2 * I * H * es,
                                    (char *)A1 + (size_t)r0 * 2 * I * es), "loop GEMM1");
                    BL_BLAS(gemm_nt(h, ct, m, H, I, (char *)A2 + (size_t)r0 * I * es,
                                    (const char *)w2 + (size_t)e * H * I * es,
                                    (char *)Y + (size_t)r0 * H * es), "loop GEMM2");
                    r0 += m;
                }
            } else { /* grouped batched, one group of one GEMM per expert */
                cublasOperation_t *ta = malloc(sizeof *ta * (size_t)ng), *tb = malloc(sizeof *tb * (size_t)ng);
                int *mm = malloc(sizeof(int) * (size_t)ng * 8);
                float *al = malloc(sizeof(float) * (size_t)ng * 2);
                if (!ta || !tb || !mm || !al) { free(ta); free(tb); free(mm); free(al); st = moe_fail(err, MOE_ERR_NOMEM, "baselines"); goto done; }
                int *n1 = mm, *k1 = mm + ng, *lda1 = mm + 2 * ng, *ldc1 = mm + 3 * ng, *one = mm + 4 * ng;
                int *n2 = mm + 5 * ng, *k2 = mm + 6 * ng, *ldc2 = mm + 7 * ng;
                for (int g = 0; g < ng; g++) {
                    ta[g] = CUBLAS_OP_T; tb[g] = CUBLAS_OP_N;
                    n1[g] = 2 * I; k1[g] = H; lda1[g] = H; ldc1[g] = 2 * I; one[g] = 1;
                    n2[g] = H; k2[g] = I; ldc2[g] = H;
                    al[g] = 1.0f; al[ng + g] = 0.0f;
                }
                cublasStatus_t s1 = cublasGemmGroupedBatchedEx(h, ta, tb, n1, gm, k1, al, (const void *const *)(dptr + 0 * ng), ct, lda1,
                                                               (const void *const *)(dptr + 1 * ng), ct, lda1, al + ng,
                                                               (void *const *)(dptr + 2 * ng), ct, ldc1, ng, one, CUBLAS_COMPUTE_32F);
                cublasStatus_t s2 = s1 != CUBLAS_STATUS_SUCCESS ? s1 :
                    cublasGemmGroupedBatchedEx(h, ta, tb, n2, gm, k2, al, (const void *const *)(dptr + 3 * ng), ct, k2,
                                               (const void *const *)(dptr + 4 * ng), ct, k2, al + ng,
                                               (void *const *)(dptr + 5 * ng), ct, ldc2, ng, one, CUBLAS_COMPUTE_32F);
                free(ta); free(tb); free(mm); free(al);
                BL_BLAS(s2, "cublasGemmGroupedBatchedEx");
            }
            BL_CUDA(cudaEventRecord(e1, 0), "cudaEventRecord");
            BL_CUDA(cudaEventSynchronize(e1), "cudaEventSynchronize");
            float ms = 0;
            BL_CUDA(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
            if (it >= warmup) t[it - warmup] = ms;
        }
        qsort(t, (size_t)iters, sizeof *t, cmp_d);
        double med = iters % 2 ? t[iters / 2] : 0.5 * (t[iters / 2 - 1] + t[iters / 2]);
        if (which == 0) out->dense_ms = med;
        else if (which == 1) out->loop_ms = med;
        else out->grouped_ms = med;
    }
done:
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    cudaFree(X); cudaFree(A1); cudaFree(A2); cudaFree(Y); cudaFree(dptr);
    if (h) cublasDestroy(h);
    free(gm); free(t);
    return st;
}

moe_status moe_cuda_copy_bandwidth(size_t bytes, int warmup, int iters, double *gbs,
                                   moe_error *err)
{
    moe_status st = MOE_OK;
    void *src = NULL, *dst = NULL;
    cudaStream_t s = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    double *t = NULL;
    *gbs = 0;
    if (bytes == 0 || iters < 1 || warmup < 0)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "copy bandwidth: bytes %zu, warmup %d, iters %d",
                        bytes, warmup, iters);
    t = calloc((size_t)iters, sizeof *t);
    if (!t) return moe_fail(err, MOE_ERR_NOMEM, "copy bandwidth");
    BL_CUDA(cudaMalloc(&src, bytes), "cudaMalloc (copy source)");
    BL_CUDA(cudaMalloc(&dst, bytes), "cudaMalloc (copy destination)");
    /* non-constant bytes in the source (a memset page could be special-cased by nothing we
     * know of, but the weights are not constant either) */
    BL_CUDA(cudaMemset(src, 0x5a, bytes), "cudaMemset");
    BL_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    BL_CUDA(cudaEventCreate(&e0), "cudaEventCreate");
    BL_CUDA(cudaEventCreate(&e1), "cudaEventCreate");
    for (int it = 0; it < warmup + iters; it++) {
        BL_CUDA(cudaEventRecord(e0, s), "cudaEventRecord");
        BL_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s), "cudaMemcpyAsync");
        BL_CUDA(cudaEventRecord(e1, s), "cudaEventRecord");
        BL_CUDA(cudaEventSynchronize(e1), "cudaEventSynchronize");
        float ms = 0;
        BL_CUDA(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
        if (it >= warmup) t[it - warmup] = ms;
    }
    qsort(t, (size_t)iters, sizeof *t, cmp_d);
    {
        double med = iters % 2 ? t[iters / 2] : 0.5 * (t[iters / 2 - 1] + t[iters / 2]);
        if (med > 0) *gbs = 2.0 * (double)bytes / (med * 1e-3) / 1e9;
    }
done:
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (s) cudaStreamDestroy(s);
    cudaFree(src);
    cudaFree(dst);
    free(t);
    return st;
}

/* NVML through dlopen: the program must start without the driver's libraries (CI, CPU-only
 * machines), and NVML is only needed for one number in the benchmark's header. Prototypes as
 * documented by NVML (nvmlReturn_t is an int enum, 0 = success; NVML_CLOCK_SM = 1). */
typedef struct nvml_device_opaque *nvml_device;
typedef int (*nvml_init_fn)(void);
typedef int (*nvml_shutdown_fn)(void);
typedef int (*nvml_by_pci_fn)(const char *, nvml_device *);
typedef int (*nvml_clock_fn)(nvml_device, int, unsigned int *);

void moe_cuda_sm_clocks(int dev, int *now_mhz, int *max_mhz, int *nvml_max_mhz)
{
    *now_mhz = *max_mhz = *nvml_max_mhz = 0;
    int khz = 0;
    if (cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev) == cudaSuccess) *max_mhz = khz / 1000;
    char bus[64];
    if (cudaDeviceGetPCIBusId(bus, (int)sizeof bus, dev) != cudaSuccess) return;
    void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return;
    /* object -> function pointer through memcpy: ISO C has no direct conversion */
    nvml_init_fn init = NULL;
    nvml_shutdown_fn fini = NULL;
    nvml_by_pci_fn by_pci = NULL;
    nvml_clock_fn clock_now = NULL, clock_max = NULL;
    void *p;
    if ((p = dlsym(lib, "nvmlInit_v2"))) memcpy(&init, &p, sizeof p);
    if ((p = dlsym(lib, "nvmlShutdown"))) memcpy(&fini, &p, sizeof p);
    if ((p = dlsym(lib, "nvmlDeviceGetHandleByPciBusId_v2"))) memcpy(&by_pci, &p, sizeof p);
    if ((p = dlsym(lib, "nvmlDeviceGetClockInfo"))) memcpy(&clock_now, &p, sizeof p);
    if ((p = dlsym(lib, "nvmlDeviceGetMaxClockInfo"))) memcpy(&clock_max, &p, sizeof p);
    if (init && fini && by_pci && clock_now && init() == 0) {
        nvml_device d = NULL;
        unsigned int mhz = 0;
        if (by_pci(bus, &d) == 0) {
            if (clock_now(d, 1 /* NVML_CLOCK_SM */, &mhz) == 0) *now_mhz = (int)mhz;
            if (clock_max && clock_max(d, 1, &mhz) == 0) *nvml_max_mhz = (int)mhz;
        }
        fini();
    }
    dlclose(lib);
}
