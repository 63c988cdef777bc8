/* topo.c — hwloc placement of EP ranks (rules in topo.h). */
#include "topo.h"

#include "ep.h"

#include <hwloc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TOPO_MAX_DEV 64

struct moe_topo {
    hwloc_topology_t h;
    bool this_system;
    int ngpu, nnic;
    hwloc_obj_t gpu[TOPO_MAX_DEV]; /* PCI bus order */
    hwloc_obj_t nic[TOPO_MAX_DEV];
};

static void busid(hwloc_obj_t o, char *buf, size_t len)
{
    snprintf(buf, len, "%04x:%02x:%02x.%x", (unsigned)o->attr->pcidev.domain,
             (unsigned)o->attr->pcidev.bus, (unsigned)o->attr->pcidev.dev,
             (unsigned)o->attr->pcidev.func);
}

static unsigned long bus_key(hwloc_obj_t o)
{
    const struct hwloc_pcidev_attr_s *p = &o->attr->pcidev;
    return ((unsigned long)p->domain << 24) | ((unsigned long)p->bus << 16) |
           ((unsigned long)p->dev << 8) | p->func;
}

static int cmp_bus(const void *a, const void *b)
{
    unsigned long x = bus_key(*(hwloc_obj_t const *)a), y = bus_key(*(hwloc_obj_t const *)b);
    return x < y ? -1 : x > y;
}

static bool is_gpu(hwloc_obj_t o)
{
    /* NVIDIA 3D controllers (SXM/PCIe data-centre parts) and VGA controllers. */
    unsigned c = o->attr->pcidev.class_id;
    return o->attr->pcidev.vendor_id == 0x10de && (c == 0x0302 || c == 0x0300);
}

static bool is_nic(hwloc_obj_t o) { return (o->attr->pcidev.class_id >> 8) == 0x02; }

moe_status moe_topo_load(const char *xml_path, moe_topo **out, moe_error *err)
{
    *out = NULL;
    moe_topo *t = moe_calloc(1, sizeof *t, "topology", err);
    if (!t) return MOE_ERR_NOMEM;
    if (hwloc_topology_init(&t->h) != 0) {
        free(t);
        return moe_fail(err, MOE_ERR_INTERNAL, "hwloc_topology_init failed");
    }
    /* PCI devices and their OS devices are what the GPU/NIC placement needs. */
    hwloc_topology_set_io_types_filter(t->h, xml_path ? HWLOC_TYPE_FILTER_KEEP_ALL
                                                      : HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
    if (xml_path && hwloc_topology_set_xml(t->h, xml_path) != 0) {
        hwloc_topology_destroy(t->h);
        free(t);
        return moe_fail(err, MOE_ERR_FORMAT, "hwloc cannot read the XML topology %s", xml_path);
    }
    if (hwloc_topology_load(t->h) != 0) {
        hwloc_topology_destroy(t->h);
        free(t);
        return moe_fail(err, MOE_ERR_FORMAT, "hwloc could not load the topology%s%s",
                        xml_path ? " from " : "", xml_path ? xml_path : "");
    }
    t->this_system = hwloc_topology_is_thissystem(t->h) != 0;
    for (hwloc_obj_t o = hwloc_get_next_pcidev(t->h, NULL); o; o = hwloc_get_next_pcidev(t->h, o)) {
        if (is_gpu(o) && t->ngpu < TOPO_MAX_DEV) t->gpu[t->ngpu++] = o;
        else if (is_nic(o) && t->nnic < TOPO_MAX_DEV) t->nic[t->nnic++] = o;
    }
    qsort(t->gpu, (size_t)t->ngpu, sizeof t->gpu[0], cmp_bus);
    qsort(t->nic, (size_t)t->nnic, sizeof t->nic[0], cmp_bus);
    *out = t;
    return MOE_OK;
}

void moe_topo_destroy(moe_topo *t)
{
    if (!t) return;
    hwloc_topology_destroy(t->h);
    free(t);
}

int moe_topo_num_gpus(const moe_topo *t) { return t->ngpu; }
int moe_topo_num_nics(const moe_topo *t) { return t->nnic; }
int moe_topo_num_numa(const moe_topo *t)
{
    int n = hwloc_get_nbobjs_by_type(t->h, HWLOC_OBJ_NUMANODE);
    return n > 0 ? n : 0;
}

/* The NUMA node nearest an object: those local to its CPU-side ancestor, else any larger. */
static hwloc_obj_t numa_of(const moe_topo *t, hwloc_obj_t o)
{
    hwloc_obj_t anc = hwloc_get_non_io_ancestor_obj(t->h, o);
    if (!anc) return NULL;
    hwloc_obj_t nodes[64];
    struct hwloc_location loc;
    loc.type = HWLOC_LOCATION_TYPE_OBJECT;
    loc.location.object = anc;
    unsigned long flag_sets[2] = {0, HWLOC_LOCAL_NUMANODE_FLAG_LARGER_LOCALITY};
    for (int f = 0; f < 2; f++) {
        unsigned nr = 64;
        if (hwloc_get_local_numanode_objs(t->h, &loc, &nr, nodes, flag_sets[f]) == 0 && nr > 0) {
            hwloc_obj_t best = nodes[0];
            for (unsigned i = 1; i < nr && i < 64; i++)
                if (nodes[i]->os_index < best->os_index) best = nodes[i];
            return best;
        }
    }
    return NULL;
}

/* Tree hops between two objects (IO objects included: their depths are negative, so the
 * walk compares ancestors, not depths). */
static int hops(hwloc_obj_t a, hwloc_obj_t b)
{
    int da = 0;
    for (hwloc_obj_t x = a; x; x = x->parent, da++) {
        int db = 0;
        for (hwloc_obj_t y = b; y; y = y->parent, db++)
            if (x == y) return da + db;
    }
    return 1 << 20;
}

static void nic_name(hwloc_obj_t nic, char *buf, size_t len)
{
    const char *ib = NULL, *net = NULL;
    for (hwloc_obj_t c = nic->io_first_child; c; c = c->next_sibling) {
        if (c->type != HWLOC_OBJ_OS_DEVICE || !c->name) continue;
        if (c->attr->osdev.type == HWLOC_OBJ_OSDEV_OPENFABRICS && !ib) ib = c->name;
        if (c->attr->osdev.type == HWLOC_OBJ_OSDEV_NETWORK && !net) net = c->name;
    }
    if (ib) snprintf(buf, len, "%s", ib);
    else if (net) snprintf(buf, len, "%s", net);
    else busid(nic, buf, len);
}

/* The NUMA node a local rank lands on (index into the NUMA level), for counting sharers. */
static hwloc_obj_t rank_numa(const moe_topo *t, int lr, int ls)
{
    if (t->ngpu > 0) return numa_of(t, t->gpu[lr % t->ngpu]);
    int nn = moe_topo_num_numa(t);
    if (nn <= 0) return NULL;
    return hwloc_get_obj_by_type(t->h, HWLOC_OBJ_NUMANODE,
                                 (unsigned)((long)lr * nn / (ls > 0 ? ls : 1)));
}

moe_status moe_topo_pick(const moe_topo *t, int local_rank, int local_size, moe_topo_binding *b,
                         moe_error *err)
{
    memset(b, 0, sizeof *b);
    if (local_size < 1 || local_rank < 0 || local_rank >= local_size)
        return moe_fail(err, MOE_ERR_INVALID_ARG, "placement: local rank %d of %d", local_rank,
                        local_size);
    b->local_rank = local_rank;
    b->local_size = local_size;
    b->gpu = -1;
    b->numa = -1;
    hwloc_obj_t gpu = NULL;
    if (t->ngpu > 0) {
        b->gpu = local_rank % t->ngpu;
        gpu = t->gpu[b->gpu];
        busid(gpu, b->gpu_busid, sizeof b->gpu_busid);
    }
    hwloc_obj_t node = rank_numa(t, local_rank, local_size);
    hwloc_const_cpuset_t set = node ? node->cpuset : hwloc_topology_get_topology_cpuset(t->h);
    if (node) b->numa = (int)node->os_index;
    hwloc_bitmap_list_snprintf(b->cpuset, sizeof b->cpuset, set);
    b->ncores = hwloc_get_nbobjs_inside_cpuset_by_type(t->h, set, HWLOC_OBJ_CORE);
    if (b->ncores <= 0) b->ncores = hwloc_get_nbobjs_inside_cpuset_by_type(t->h, set, HWLOC_OBJ_PU);
    int sharing = 0;
    for (int j = 0; j < local_size; j++)
        if (rank_numa(t, j, local_size) == node) sharing++;
    b->threads_hint = sharing > 0 ? b->ncores / sharing : b->ncores;
    if (b->threads_hint < 1) b->threads_hint = 1;

    hwloc_obj_t best = NULL;
    int best_h = 1 << 30;
    for (int i = 0; i < t->nnic; i++) {
        hwloc_obj_t n = t->nic[i];
        int h;
        if (gpu) {
            h = hops(gpu, n);
        } else {
            /* No GPU: the first NIC whose NUMA node is ours. */
            h = numa_of(t, n) == node ? 0 : 1 << 20;
        }
        if (h < best_h) { /* NICs are in bus order: ties keep the lower bus id */
            best_h = h;
            best = n;
        }
    }
    if (best) {
        nic_name(best, b->nic, sizeof b->nic);
        busid(best, b->nic_busid, sizeof b->nic_busid);
    }
    return MOE_OK;
}

moe_status moe_topo_bind(const moe_topo *t, const moe_topo_binding *b, moe_error *err)
{
    if (!t->this_system)
        return moe_fail(err, MOE_ERR_UNSUPPORTED,
                        "cannot bind to a topology that is not this machine's (loaded from XML)");
    hwloc_bitmap_t set = hwloc_bitmap_alloc();
    if (!set) return moe_fail(err, MOE_ERR_NOMEM, "hwloc bitmap");
    if (hwloc_bitmap_list_sscanf(set, b->cpuset) != 0 || hwloc_bitmap_iszero(set)) {
        hwloc_bitmap_free(set);
        return moe_fail(err, MOE_ERR_INVALID_ARG, "bind: bad cpuset '%s'", b->cpuset);
    }
    /* The whole process (all its OpenMP threads) moves to the NUMA node's cores. */
    int rc = hwloc_set_cpubind(t->h, set, HWLOC_CPUBIND_PROCESS);
    hwloc_bitmap_free(set);
    if (rc != 0)
        return moe_fail(err, MOE_ERR_UNSUPPORTED, "hwloc_set_cpubind to %s failed", b->cpuset);
    return MOE_OK;
}

void moe_topo_print(FILE *f, const moe_topo *t, const moe_topo_binding *b, int nb)
{
    int npk = hwloc_get_nbobjs_by_type(t->h, HWLOC_OBJ_PACKAGE);
    int ncore = hwloc_get_nbobjs_by_type(t->h, HWLOC_OBJ_CORE);
    int npu = hwloc_get_nbobjs_by_type(t->h, HWLOC_OBJ_PU);
    fprintf(f, "topology%s: %d package(s), %d NUMA node(s), %d core(s), %d PU(s), %d GPU(s), "
               "%d NIC(s)\n",
            t->this_system ? "" : " (from XML)", npk, moe_topo_num_numa(t), ncore, npu, t->ngpu,
            t->nnic);
    for (int i = 0; i < moe_topo_num_numa(t); i++) {
        hwloc_obj_t n = hwloc_get_obj_by_type(t->h, HWLOC_OBJ_NUMANODE, (unsigned)i);
        char cs[256];
        hwloc_bitmap_list_snprintf(cs, sizeof cs, n->cpuset);
        fprintf(f, "  NUMA %u: cpus %s\n", n->os_index, cs);
    }
    for (int i = 0; i < t->ngpu; i++) {
        char id[20];
        busid(t->gpu[i], id, sizeof id);
        hwloc_obj_t n = numa_of(t, t->gpu[i]);
        fprintf(f, "  GPU %d: %s [%04x:%04x] NUMA %d\n", i, id, t->gpu[i]->attr->pcidev.vendor_id,
                t->gpu[i]->attr->pcidev.device_id, n ? (int)n->os_index : -1);
    }
    for (int i = 0; i < t->nnic; i++) {
        char id[20], nm[32];
        busid(t->nic[i], id, sizeof id);
        nic_name(t->nic[i], nm, sizeof nm);
        hwloc_obj_t n = numa_of(t, t->nic[i]);
        fprintf(f, "  NIC %d: %s (%s) NUMA %d\n", i, nm, id, n ? (int)n->os_index : -1);
    }
    for (int i = 0; i < nb; i++)
        fprintf(f, "  local rank %d/%d: GPU %d %s, NUMA %d, cpus %s (%d cores, %d threads), "
                   "NIC %s\n",
                b[i].local_rank, b[i].local_size, b[i].gpu, b[i].gpu_busid[0] ? b[i].gpu_busid : "-",
                b[i].numa, b[i].cpuset, b[i].ncores, b[i].threads_hint,
                b[i].nic[0] ? b[i].nic : "-");
}

moe_status moe_topo_local_rank(MPI_Comm comm, int *local_rank, int *local_size, moe_error *err)
{
    MPI_Comm local = MPI_COMM_NULL;
    int rank = 0;
    MPI_Comm_rank(comm, &rank);
    int rc = MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(local, local_rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(local, local_size);
    if (local != MPI_COMM_NULL) MPI_Comm_free(&local);
    if (rc != MPI_SUCCESS)
        return moe_fail(err, MOE_ERR_MPI, "rank %d: MPI_Comm_split_type (node-local ranks) failed",
                        rank);
    return MOE_OK;
}

moe_status moe_topo_report(MPI_Comm comm, const moe_topo *t, bool bind, FILE *f, moe_error *err)
{
    int rank = 0, n = 1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &n);
    /* Fixed-size record per rank, gathered to rank 0 for one ordered printout. */
    struct rec {
        moe_topo_binding b;
        char host[64];
        char note[160];
    } mine;
    memset(&mine, 0, sizeof mine);
    int lr = 0, ls = 1;
    moe_status st = moe_topo_local_rank(comm, &lr, &ls, err);
    if (st == MOE_OK) st = moe_topo_pick(t, lr, ls, &mine.b, err);
    if (st == MOE_OK && bind) {
        moe_error be;
        moe_error_clear(&be);
        if (moe_topo_bind(t, &mine.b, &be) != MOE_OK)
            snprintf(mine.note, sizeof mine.note, "not bound: %.140s", be.msg);
        else
            snprintf(mine.note, sizeof mine.note, "bound");
    }
    if (st != MOE_OK) snprintf(mine.note, sizeof mine.note, "placement failed: %.130s", err ? err->msg : "");
    gethostname(mine.host, sizeof mine.host - 1);
    struct rec *all = NULL;
    moe_status ast = MOE_OK;
    if (rank == 0) {
        all = moe_calloc((size_t)n, sizeof *all, "topology report", err);
        if (!all) ast = MOE_ERR_NOMEM;
    }
    /* Nobody enters the gather unless rank 0 has somewhere to put it. */
    ast = ep_agree(comm, ast, err);
    if (ast != MOE_OK) {
        free(all);
        return ast;
    }
    int rc = MPI_Gather(&mine, (int)sizeof mine, MPI_BYTE, all, (int)sizeof mine, MPI_BYTE, 0, comm);
    if (rc != MPI_SUCCESS) {
        free(all);
        return moe_fail(err, MOE_ERR_MPI, "rank %d: MPI_Gather (topology report) failed", rank);
    }
    if (rank == 0) {
        moe_topo_print(f, t, NULL, 0);
        for (int r = 0; r < n; r++)
            fprintf(f, "  rank %d on %s: local %d/%d, GPU %d %s, NUMA %d, cpus %s (%d threads), "
                       "NIC %s%s%s\n",
                    r, all[r].host, all[r].b.local_rank, all[r].b.local_size, all[r].b.gpu,
                    all[r].b.gpu_busid[0] ? all[r].b.gpu_busid : "-", all[r].b.numa,
                    all[r].b.cpuset, all[r].b.threads_hint, all[r].b.nic[0] ? all[r].b.nic : "-",
                    all[r].note[0] ? "; " : "", all[r].note);
        free(all);
    }
    return st;
}

moe_status moe_topo_bind_from_env(MPI_Comm comm, moe_topo_binding *out, bool *bound,
                                  moe_error *err)
{
    *bound = false;
    const char *e = getenv("MOE_BIND");
    if (!e || strcmp(e, "1") != 0) return MOE_OK;
    int lr = 0, ls = 1;
    /* The node-local split is collective; everything after it is local to this rank. */
    MOE_TRY(moe_topo_local_rank(comm, &lr, &ls, err));
    moe_topo *t = NULL;
    MOE_TRY(moe_topo_load(NULL, &t, err));
    moe_topo_binding b;
    moe_status st = moe_topo_pick(t, lr, ls, &b, err);
    if (st == MOE_OK) st = moe_topo_bind(t, &b, err);
    if (st == MOE_OK) {
        *bound = true;
        if (out) *out = b;
        moe_info("local rank %d/%d bound to cpus %s (NUMA %d), GPU %d, NIC %s", lr, ls, b.cpuset,
                 b.numa, b.gpu, b.nic[0] ? b.nic : "-");
    }
    moe_topo_destroy(t);
    return st;
}
