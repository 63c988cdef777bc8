/*
 * topo.h — placement of EP ranks on a node with hwloc: each node-local rank gets a GPU (PCI bus
 * order, the order CUDA uses with CUDA_DEVICE_ORDER=PCI_BUS_ID, which launch/moe-mpirun sets),
 * is bound to the cores of the NUMA node nearest that GPU, and is told the nearest NIC (fewest
 * PCI hops from its GPU) for NCCL_IB_HCA-style pinning.
 *
 * The topology is this machine's or an hwloc XML export (the XML files under tests/fixtures/topo), so the
 * placement logic is testable without the hardware. Binding applies only to this machine.
 *
 * Rules:
 *   GPU      local rank i -> GPU i mod nGPU (several ranks share a GPU only on the MPI
 *            transport; NCCL refuses it). No GPU: gpu = -1.
 *   NUMA     the NUMA node(s) local to the GPU's CPU-side ancestor (first by os index); no
 *            GPU: NUMA nodes are dealt out in blocks, node = i * nNUMA / local_size.
 *   cpuset   that NUMA node's cores; threads_hint = its cores / ranks placed on it (>= 1).
 *   NIC      among PCI network devices (class 02xx), the fewest tree hops from the GPU (tie:
 *            lower bus id); without a GPU, the first NIC local to the NUMA node. Named by
 *            its OpenFabrics device ("mlx5_0") when it has one, else its network name, else
 *            the bus id.
 */
#ifndef MOE_TOPO_H
#define MOE_TOPO_H

#include <mpi.h>
#include <stdbool.h>
#include <stdio.h>

#include "../common.h"

typedef struct moe_topo moe_topo;

typedef struct moe_topo_binding {
    int local_rank, local_size;
    int gpu;              /* index among the node's GPUs, -1 = none */
    char gpu_busid[20];   /* "0000:11:00.0" */
    int numa;             /* NUMA node os index, -1 = unknown */
    char cpuset[256];     /* hwloc list form, "0-7" */
    int ncores;           /* cores in cpuset */
    int threads_hint;     /* ncores / ranks sharing that NUMA node */
    char nic[32];         /* "mlx5_0", "eth0" or a bus id; "" = none */
    char nic_busid[20];
} moe_topo_binding;

/* xml_path NULL: this machine (IO devices included). Else an hwloc XML file. */
moe_status moe_topo_load(const char *xml_path, moe_topo **out, moe_error *err);
void moe_topo_destroy(moe_topo *t);
int moe_topo_num_gpus(const moe_topo *t);
int moe_topo_num_numa(const moe_topo *t);
int moe_topo_num_nics(const moe_topo *t);
/* Where local rank `local_rank` of `local_size` goes (rules above). */
moe_status moe_topo_pick(const moe_topo *t, int local_rank, int local_size, moe_topo_binding *b,
                         moe_error *err);
/* Bind this process's threads to b->cpuset. MOE_ERR_UNSUPPORTED for a topology that is not
 * this machine's (an XML file). */
moe_status moe_topo_bind(const moe_topo *t, const moe_topo_binding *b, moe_error *err);
/* Packages, NUMA nodes, cores, GPUs and NICs (with their NUMA node), then one line per
 * binding given. */
void moe_topo_print(FILE *f, const moe_topo *t, const moe_topo_binding *b, int nb);
/* Node-local rank and size of the caller in comm (MPI_Comm_split_type SHARED). */
moe_status moe_topo_local_rank(MPI_Comm comm, int *local_rank, int *local_size, moe_error *err);
/* For `moe-ep info`: every rank picks (and binds when `bind`), rank 0 prints the topology and
 * every rank's binding (host name, rank, local rank, GPU, NUMA, cpuset, NIC). Collective. */
moe_status moe_topo_report(MPI_Comm comm, const moe_topo *t, bool bind, FILE *f,
                           moe_error *err);

/* For programs started by `moe-mpirun --bind program` (which exports MOE_BIND=1): when MOE_BIND
 * is 1, load this machine's topology, pick this rank's place among the node-local ranks of
 * comm and bind to it; *bound tells whether it did. out (may be NULL) receives the placement
 * (its gpu is the CUDA device to use, with CUDA_DEVICE_ORDER=PCI_BUS_ID). Collective. */
moe_status moe_topo_bind_from_env(MPI_Comm comm, moe_topo_binding *out, bool *bound,
                                  moe_error *err);

#endif /* MOE_TOPO_H */
