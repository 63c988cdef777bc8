/* cli_info.c — `moe-ep info`: what this build has (backends, NCCL, GPUs), the machine's
 * topology from hwloc, and where each MPI rank goes (GPU, NUMA node, cores, nearest NIC). Under
 * mpirun every rank reports its placement; --topology FILE reads an hwloc XML instead (how the
 * placement rules are checked for a machine you are not on). */
#include <mpi.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "cli_opts.h"
#include "ep/topo.h"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>
#include <nccl.h>
#endif

int cli_info(int argc, char **argv)
{
    const char *xml = NULL;
    bool bind = false;
    cli_opt opts[] = {
        {"topology", OPT_STRING, "FILE.xml", "read an hwloc XML topology instead of this machine's", .str = &xml},
        {"bind", OPT_FLAG, NULL, "also bind each rank to its cores (this machine only)", .flag = &bind},
        {0},
    };
    int rc = cli_parse("info", "[--topology FILE.xml] [--bind]",
                       "Prints the build's backends, the GPUs, the hwloc topology and each MPI rank's\n"
                       "placement: GPU, nearest NUMA node and its cores, nearest NIC.", opts, argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    MPI_Init(NULL, NULL);
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (rank == 0) {
        printf("moe-ep %s\n", MOE_EP_VERSION);
#ifdef MOE_HAVE_CUDA
        int n = 0, rt = 0, drv = 0, nv = 0;
        cudaError_t e = cudaGetDeviceCount(&n);
        cudaRuntimeGetVersion(&rt);
        cudaDriverGetVersion(&drv);
        ncclGetVersion(&nv);
        printf("backends: cpu, cuda (runtime %d, driver %d), NCCL %d\n", rt, drv, nv);
        if (e != cudaSuccess) printf("GPUs: none usable (%s)\n", cudaGetErrorString(e));
        for (int i = 0; i < n; i++) {
            struct cudaDeviceProp p;
            if (cudaGetDeviceProperties(&p, i) == cudaSuccess)
                printf("GPU %d: %s, sm_%d%d, %d SMs, %.1f GiB, PCI %04x:%02x:%02x\n", i, p.name, p.major,
                       p.minor, p.multiProcessorCount, p.totalGlobalMem / 1073741824.0, p.pciDomainID,
                       p.pciBusID, p.pciDeviceID);
        }
#else
        printf("backends: cpu only (built with MOE_ENABLE_CUDA=OFF or without a CUDA toolkit)\n");
#endif
        printf("MPI ranks: %d\n\n", size);
        fflush(stdout);
    }
    moe_error err = {0};
    moe_topo *t = NULL;
    int status = 0;
    if (moe_topo_load(xml, &t, &err) != MOE_OK ||
        moe_topo_report(MPI_COMM_WORLD, t, bind && !xml, stdout, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep info: %s\n", err.msg);
        status = 1;
    }
    moe_topo_destroy(t);
    MPI_Finalize();
    return status;
}
