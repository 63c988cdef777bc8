/* ep_test.c — see ep_test.h. */
#include "ep_test.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dtype.h"
#include "rng.h"
#include "test_util.h"

static int wrank(void)
{
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}

/* ------------------------------------------------------------------ layers ---- */

bool ept_config_write(char *path, size_t len, bool llama, int H, int I, int E, int k, bool norm,
                     const char *dtype)
{
    char dir[] = "/tmp/moe_ep_test_XXXXXX";
    if (!mkdtemp(dir)) return false;
    snprintf(path, len, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return false;
    if (llama)
        fprintf(f, "{\"model_type\": \"llama4_text\", \"hidden_size\": %d, \"intermediate_size\": "
                   "%d, \"num_local_experts\": %d, \"num_experts_per_tok\": %d, \"torch_dtype\": "
                   "\"%s\"}\n", H, I, E, k, dtype);
    else
        fprintf(f, "{\"model_type\": \"qwen3_moe\", \"hidden_size\": %d, "
                   "\"moe_intermediate_size\": %d, \"num_experts\": %d, \"num_experts_per_tok\": "
                   "%d, \"norm_topk_prob\": %s, \"torch_dtype\": \"%s\"}\n",
                H, I, E, k, norm ? "true" : "false", dtype);
    return fclose(f) == 0;
}

void ept_config_remove(const char *path)
{
    char dir[512];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    unlink(path);
    if (slash) {
        *slash = '\0';
        rmdir(dir);
    }
}

moe_status ept_comm_make(MPI_Comm comm, const moe_ep_options *o, moe_ep_comm **out)
{
    return moe_ep_comm_create((int32_t)MPI_Comm_c2f(comm), o, out);
}

moe_status ept_layer_make(const char *config, moe_dtype dt, uint64_t wseed, moe_ep_comm *comm,
                         const int32_t *map, moe_layer **out)
{
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    src.kind = MOE_WEIGHTS_RANDOM;
    src.seed = wseed;
    moe_layer_options o = MOE_LAYER_OPTIONS_INIT;
    o.backend = MOE_BACKEND_CPU;
    o.dtype = dt;
    /* the cores were shared between this node's ranks by the test's start-up */
    o.threads = omp_get_max_threads();
    o.comm = comm;
    o.expert_map = map;
    return moe_layer_create(config, &src, &o, out);
}

bool ept_shape_of(const moe_layer *L, ept_shape *s)
{
    moe_layer_info i = MOE_LAYER_INFO_INIT;
    memset(s, 0, sizeof *s);
    if (moe_layer_info_get(L, &i) != MOE_OK) {
        fprintf(stderr, "rank %d: moe_layer_info_get: %s\n", wrank(), moe_last_error());
        return false;
    }
    if (i.num_local_experts > (int)(sizeof s->local / sizeof s->local[0])) return false;
    s->H = i.hidden;
    s->I = i.inter;
    s->E = i.num_experts;
    s->k = i.top_k;
    s->Is = i.shared_inter;
    s->El = i.num_local_experts;
    s->rank = i.rank;
    s->nranks = i.nranks;
    s->V = i.virtual_ranks;
    s->llama = i.arch == 1;
    s->dt = i.dtype;
    s->dsz = moe_dtype_size(i.dtype);
    snprintf(s->transport, sizeof s->transport, "%s", i.transport);
    if (s->El) memcpy(s->local, i.local_experts, (size_t)s->El * sizeof(int32_t));
    return true;
}

/* ------------------------------------------------------------------ calls ---- */

/* At least one byte, so a [0,...] view still has memory behind it. */
static void *poison_alloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) abort();
    memset(p, 0xff, bytes ? bytes : 1); /* all-ones: NaN in every float format */
    return p;
}

void ept_io_alloc(const ept_shape *s, int64_t T, ept_io *io)
{
    const size_t t = (size_t)T, H = (size_t)s->H, I = (size_t)s->I, d = s->dsz;
    const size_t El = (size_t)s->El, Is = (size_t)s->Is;
    memset(io, 0, sizeof *io);
    io->T = T;
    io->out = poison_alloc(t * H * d);
    io->logits = poison_alloc(t * (size_t)s->E * d);
    io->dx = poison_alloc(t * H * d);
    io->g_router = poison_alloc((size_t)s->E * H * d);
    io->g_w13 = poison_alloc(El * 2 * I * H * d);
    io->g_w2 = poison_alloc(El * H * I * d);
    if (Is) {
        io->g_sg = poison_alloc(Is * H * d);
        io->g_su = poison_alloc(Is * H * d);
        io->g_sd = poison_alloc(H * Is * d);
    }
}

void ept_io_free(ept_io *io)
{
    void *all[] = {io->out, io->logits, io->dx, io->g_router, io->g_w13, io->g_w2,
                   io->g_sg, io->g_su, io->g_sd};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
    memset(io, 0, sizeof *io);
}

static moe_tensor_view view2(moe_dtype dt, int64_t rows, int64_t cols, const void *p)
{
    moe_tensor_view v;
    memset(&v, 0, sizeof v);
    v.dtype = dt;
    v.ndim = 2;
    v.shape[0] = rows;
    v.shape[1] = cols;
    v.data = (void *)p;
    return v;
}

moe_status ept_forward(moe_layer *L, const ept_shape *s, const void *x, bool async, ept_io *io)
{
    const size_t t = (size_t)io->T;
    memset(io->out, 0xff, t * s->H * s->dsz);
    memset(io->logits, 0xff, t * s->E * s->dsz);
    if (async) return moe_layer_forward_async(L, io->T, x, io->out, io->logits, NULL);
    moe_tensor_view xv = view2(s->dt, io->T, s->H, x), ov = view2(s->dt, io->T, s->H, io->out);
    moe_tensor_view lv = view2(s->dt, io->T, s->E, io->logits);
    return moe_layer_forward(L, &xv, &ov, &lv);
}

moe_status ept_backward(moe_layer *L, const ept_shape *s, const void *x, const void *dout,
                       const void *dlog, bool async, ept_io *io)
{
    const size_t t = (size_t)io->T, H = (size_t)s->H, I = (size_t)s->I, d = s->dsz;
    const size_t El = (size_t)s->El, Is = (size_t)s->Is;
    memset(io->dx, 0xff, t * H * d);
    memset(io->g_router, 0xff, (size_t)s->E * H * d);
    memset(io->g_w13, 0xff, El * 2 * I * H * d);
    memset(io->g_w2, 0xff, El * H * I * d);
    if (Is) {
        memset(io->g_sg, 0xff, Is * H * d);
        memset(io->g_su, 0xff, Is * H * d);
        memset(io->g_sd, 0xff, H * Is * d);
    }
    moe_layer_grads g = {io->g_router, io->g_w13, io->g_w2, io->g_sg, io->g_su, io->g_sd};
    if (async) return moe_layer_backward_async(L, io->T, x, dout, dlog, io->dx, &g, NULL);
    moe_tensor_view xv = view2(s->dt, io->T, s->H, x), dv = view2(s->dt, io->T, s->H, dout);
    moe_tensor_view lv = view2(s->dt, io->T, s->E, dlog), dxv = view2(s->dt, io->T, s->H, io->dx);
    return moe_layer_backward(L, &xv, &dv, dlog ? &lv : NULL, &dxv, &g);
}

/* ------------------------------------------------------------------ data ---- */

void *ept_global(moe_dtype dt, size_t n, uint64_t seed, const char *name)
{
    void *p = malloc((n ? n : 1) * moe_dtype_size(dt));
    if (!p) abort();
    moe_fill_normal(dt, p, n, seed, name, 0, 1.0);
    return p;
}

void ept_split(int Tg, int N, bool skewed, int *cnt, int *off)
{
    if (!skewed || N == 1) {
        for (int r = 0; r < N; r++) cnt[r] = Tg / N + (r < Tg % N ? 1 : 0);
    } else {
        int shares = 0, given = 0;
        for (int r = 0; r < N - 1; r++) shares += r + 1;
        for (int r = 0; r < N - 1; r++) given += cnt[r] = Tg * (r + 1) / shares;
        cnt[0] += Tg - given;
        cnt[N - 1] = 0;
    }
    off[0] = 0;
    for (int r = 0; r < N; r++) off[r + 1] = off[r] + cnt[r];
}

/* ------------------------------------------------------------------ comparisons ---- */

bool ept_close(const char *what, moe_dtype dt, const void *a, const void *ref, size_t rows,
              size_t cols, double tol, size_t *ndiff)
{
    const size_t n = rows * cols, es = moe_dtype_size(dt);
    if (ndiff) {
        *ndiff = 0;
        for (size_t i = 0; i < n; i++)
            *ndiff += memcmp((const char *)a + i * es, (const char *)ref + i * es, es) != 0;
    }
    if (n == 0) return true;
    double *ad = malloc(n * sizeof(double)), *rd = malloc(n * sizeof(double));
    if (!ad || !rd) abort();
    for (size_t i = 0; i < n; i++) {
        ad[i] = moe_load_elem(dt, a, i);
        rd[i] = moe_load_elem(dt, ref, i);
    }
    char label[128];
    snprintf(label, sizeof label, "r%d %s", wrank(), what);
    bool ok = moe_test_close(label, ad, rd, rows, cols, tol);
    free(ad);
    free(rd);
    return ok;
}

bool ept_bitwise(const char *what, const void *a, const void *b, size_t bytes, size_t esz)
{
    if (memcmp(a, b, bytes) == 0) return true;
    size_t i = 0;
    while (i + esz <= bytes && memcmp((const char *)a + i, (const char *)b + i, esz) == 0)
        i += esz;
    fprintf(stderr, "rank %d: %s: not bitwise equal (first at element %zu of %zu)\n", wrank(),
            what, i / esz, bytes / esz);
    return false;
}

bool ept_same_on_all(MPI_Comm comm, const char *what, const void *p, size_t bytes)
{
    void *root = malloc(bytes ? bytes : 1);
    if (!root) abort();
    memcpy(root, p, bytes);
    MPI_Bcast(root, (int)bytes, MPI_BYTE, 0, comm);
    bool ok = memcmp(root, p, bytes) == 0;
    if (!ok) fprintf(stderr, "rank %d: %s differs from rank 0's\n", wrank(), what);
    free(root);
    return ok;
}

/* index of global expert e among ids [n] (ascending), -1 if absent */
static int find_id(const int32_t *ids, int n, int e)
{
    for (int i = 0; i < n; i++)
        if (ids[i] == e) return i;
    return -1;
}

bool ept_compare(MPI_Comm comm, const ept_shape *s, const ept_io *got, const ept_shape *ref_s,
                const ept_io *ref, int64_t off, bool backward, ept_bits *bits)
{
    bool ok = true;
    const moe_dtype dt = s->dt;
    const size_t T = (size_t)got->T, H = (size_t)s->H, E = (size_t)s->E, I = (size_t)s->I;
    const size_t d = s->dsz, Is = (size_t)s->Is;
    const double tol = moe_test_tol(dt, false), gtol = moe_test_tol(dt, true);
    size_t nd = 0;
    if (!backward) {
        ok &= ept_close("forward out", dt, got->out, (const char *)ref->out + off * H * d, T, H,
                       tol, &nd);
        if (bits && dt == MOE_DTYPE_F32) {
            bits->out_diff += nd;
            bits->out_n += T * H;
        }
        ok &= ept_close("router logits", dt, got->logits, (const char *)ref->logits + off * E * d,
                       T, E, tol, NULL);
        return ok;
    }
    ok &= ept_close("backward dx", dt, got->dx, (const char *)ref->dx + off * H * d, T, H, gtol,
                   &nd);
    if (bits && dt == MOE_DTYPE_F32) {
        bits->dx_diff += nd;
        bits->dx_n += T * H;
    }
    /* the experts this rank owns: bitwise the reference's slices */
    const size_t w13 = 2 * I * H * d, w2 = H * I * d;
    for (int l = 0; l < s->El; l++) {
        int e = s->local[l], r = find_id(ref_s->local, ref_s->El, e);
        char what[64];
        if (r < 0) {
            fprintf(stderr, "rank %d: expert %d is not in the reference\n", wrank(), e);
            ok = false;
            continue;
        }
        snprintf(what, sizeof what, "d w13 of expert %d", e);
        ok &= ept_bitwise(what, (const char *)got->g_w13 + l * w13,
                         (const char *)ref->g_w13 + r * w13, w13, d);
        snprintf(what, sizeof what, "d w2 of expert %d", e);
        ok &= ept_bitwise(what, (const char *)got->g_w2 + l * w2,
                         (const char *)ref->g_w2 + r * w2, w2, d);
    }
    /* the replicated weights: the reference's within tolerance, the same bits on every rank */
    struct {
        const char *what;
        const void *a, *b;
        size_t rows, cols;
    } rep[4] = {
        {"d router", got->g_router, ref->g_router, E, H},
        {"d shared gate", got->g_sg, ref->g_sg, Is, H},
        {"d shared up", got->g_su, ref->g_su, Is, H},
        {"d shared down", got->g_sd, ref->g_sd, H, Is},
    };
    for (int i = 0; i < (Is ? 4 : 1); i++) {
        ok &= ept_close(rep[i].what, dt, rep[i].a, rep[i].b, rep[i].rows, rep[i].cols, gtol, &nd);
        ok &= ept_same_on_all(comm, rep[i].what, rep[i].a, rep[i].rows * rep[i].cols * d);
        if (bits && dt == MOE_DTYPE_F32) {
            bits->rep_diff += nd;
            bits->rep_n += rep[i].rows * rep[i].cols;
        }
    }
    return ok;
}

/* ------------------------------------------------------------------ routing and counters ---- */

void ept_placement(int E, int N, int V, const int32_t *map, int32_t *owner, int32_t *vowner,
                  int32_t *vlocal)
{
    if (map) {
        memcpy(owner, map, (size_t)E * sizeof(int32_t));
    } else {
        int e = 0;
        for (int r = 0; r < N; r++)
            for (int i = 0; i < E / N + (r < E % N ? 1 : 0); i++) owner[e++] = r;
    }
    for (int r = 0; r < N; r++) {
        int n = 0;
        for (int e = 0; e < E; e++) n += owner[e] == r;
        /* walk rank r's experts in id order, filling part v before part v+1 */
        int v = 0, in_part = 0;
        for (int e = 0; e < E; e++) {
            if (owner[e] != r) continue;
            while (in_part == n / V + (v < n % V ? 1 : 0)) {
                v++;
                in_part = 0;
            }
            vowner[e] = r * V + v;
            vlocal[e] = in_part++;
        }
    }
}

void ept_topk_of_logits(moe_dtype dt, const void *row, int E, int k, int32_t *ids)
{
    bool *taken = calloc((size_t)E, 1);
    if (!taken) abort();
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || moe_load_elem(dt, row, e) > moe_load_elem(dt, row, best)))
                best = e;
        taken[best] = true;
        ids[j] = best;
    }
    free(taken);
}

void ept_gather_ids(MPI_Comm comm, const int *cnt, const int *off, int k, const int32_t *mine,
                   int32_t *all)
{
    int N = 1, me = 0;
    MPI_Comm_size(comm, &N);
    MPI_Comm_rank(comm, &me);
    int *rc = malloc((size_t)N * sizeof(int)), *rd = malloc((size_t)N * sizeof(int));
    if (!rc || !rd) abort();
    for (int r = 0; r < N; r++) {
        rc[r] = cnt[r] * k;
        rd[r] = off[r] * k;
    }
    MPI_Allgatherv(mine, cnt[me] * k, MPI_INT32_T, all, rc, rd, MPI_INT32_T, comm);
    free(rc);
    free(rd);
}

/* Whether token t (ids row) goes to virtual rank d. */
static bool goes_to(const int32_t *row, int k, const int32_t *vowner, int d)
{
    for (int j = 0; j < k; j++)
        if (vowner[row[j]] == d) return true;
    return false;
}

#define CHECKC(cond)                                                                          \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "rank %d: %s:%d: counter check failed: %s\n", wrank(), __FILE__,  \
                    __LINE__, #cond);                                                         \
            ok = false;                                                                       \
        }                                                                                     \
    } while (0)

bool ept_check_counters(const moe_layer *L, const ept_shape *s, int N, int V, int me,
                       const int *off, const int32_t *ids_g, const int32_t *vowner, int kind,
                       int calls, int nchunks, bool plain)
{
    bool ok = true;
    uint64_t *ps = calloc((size_t)N, 8), *pr = calloc((size_t)N, 8), *pbs = calloc((size_t)N, 8),
             *pbr = calloc((size_t)N, 8);
    uint64_t *sent = calloc((size_t)N, 8), *recv = calloc((size_t)N, 8);
    if (!ps || !pr || !pbs || !pbr || !sent || !recv) abort();
    moe_layer_stats st = MOE_LAYER_STATS_INIT;
    st.peers = N;
    st.peer_rows_sent = ps;
    st.peer_rows_recv = pr;
    st.peer_bytes_sent = pbs;
    st.peer_bytes_recv = pbr;
    if (moe_layer_stats_get(L, &st) != MOE_OK) {
        fprintf(stderr, "rank %d: moe_layer_stats_get: %s\n", wrank(), moe_last_error());
        ok = false;
        goto done;
    }
    const int k = s->k;
    const uint64_t T = (uint64_t)(off[me + 1] - off[me]);
    CHECKC(st.calls_forward == (uint64_t)(kind == 1 ? calls : 0));
    CHECKC(st.calls_backward == (uint64_t)(kind == 2 ? calls : 0));
    CHECKC(st.tokens_local == (uint64_t)calls * T);
    CHECKC(st.last_call == kind);
    CHECKC(st.last_tokens == (int64_t)T);
    if (plain) {
        CHECKC(st.rows_sent == 0 && st.rows_recv == 0 && st.bytes_sent == 0);
        CHECKC(st.tokens_computed == (uint64_t)calls * T);
        goto done;
    }
    /* expected rows per real peer: the sum over its virtual ranks */
    for (int q = 0; q < N; q++)
        for (int v = 0; v < V; v++) {
            const int d = q * V + v, dm = me * V + v;
            for (int t = off[me]; t < off[me + 1]; t++)
                sent[q] += goes_to(ids_g + (size_t)t * k, k, vowner, d);
            for (int t = off[q]; t < off[q + 1]; t++)
                recv[q] += goes_to(ids_g + (size_t)t * k, k, vowner, dm);
        }
    const size_t H = (size_t)s->H, dsz = s->dsz;
    size_t out_row = H * dsz + (size_t)k * (4 + dsz), back_row = H * dsz;
    if (kind == 2) {
        out_row += H * dsz;             /* dout travels with x */
        back_row += (size_t)k * 4;      /* fp32 d-weights come back with dx */
    }
    uint64_t tot_s = 0, tot_r = 0;
    for (int q = 0; q < N; q++) {
        const uint64_t es = calls * sent[q], er = calls * recv[q];
        tot_s += es;
        tot_r += er;
        CHECKC(ps[q] == es);
        CHECKC(pr[q] == er);
        CHECKC(pbs[q] == es * out_row + er * back_row);
        CHECKC(pbr[q] == er * out_row + es * back_row);
        if (ps[q] != es || pr[q] != er)
            fprintf(stderr, "rank %d peer %d: rows sent %llu (expected %llu), received %llu "
                    "(%llu)\n", me, q, (unsigned long long)ps[q], (unsigned long long)es,
                    (unsigned long long)pr[q], (unsigned long long)er);
    }
    CHECKC(st.rows_sent == tot_s && st.rows_recv == tot_r);
    CHECKC(st.tokens_computed == tot_r);
    CHECKC(st.bytes_sent == tot_s * out_row + tot_r * back_row);
    CHECKC(st.bytes_recv == tot_r * out_row + tot_s * back_row);
    CHECKC(st.nchunks == nchunks);
    if (nchunks > 1 && st.nchunks == nchunks) {
        /* the last call's timeline: every chunk's events in order, its rows and tokens adding
         * up to the call's */
        int64_t tok = 0, rs = 0, rr = 0;
        for (int c = 0; c < nchunks; c++) {
            const moe_chunk_timeline *tl = &st.timeline[c];
            CHECKC(tl->dispatch_post >= 0);
            CHECKC(tl->dispatch_post <= tl->dispatch_done);
            CHECKC(tl->dispatch_done <= tl->compute_begin);
            CHECKC(tl->compute_begin <= tl->compute_end);
            CHECKC(tl->compute_end <= tl->combine_post);
            CHECKC(tl->combine_post <= tl->combine_done);
            CHECKC(tl->combine_done <= st.last_seconds);
            if (c > 0) CHECKC(st.timeline[c - 1].compute_end <= tl->compute_begin);
            tok += tl->tokens;
            rs += tl->rows_sent;
            rr += tl->rows_recv;
        }
        CHECKC(tok == (int64_t)T);
        CHECKC((uint64_t)rs == tot_s / calls && (uint64_t)rr == tot_r / calls);
        for (int c = nchunks; c < MOE_STATS_MAX_CHUNKS; c++) CHECKC(st.timeline[c].tokens == 0);
    }
done:
    free(ps);
    free(pr);
    free(pbs);
    free(pbr);
    free(sent);
    free(recv);
    return ok;
}

bool ept_check_unrouted_zero(const ept_shape *s, const ept_io *io, const int32_t *ids_g, int Tg)
{
    bool ok = true;
    const size_t w13 = 2 * (size_t)s->I * s->H, w2 = (size_t)s->H * s->I;
    for (int l = 0; l < s->El; l++) {
        const int e = s->local[l];
        bool routed = false;
        for (size_t i = 0; i < (size_t)Tg * s->k; i++) routed |= ids_g[i] == e;
        size_t nonzero = 0;
        for (size_t i = 0; i < w13; i++)
            nonzero += moe_load_elem(s->dt, io->g_w13, l * w13 + i) != 0.0;
        for (size_t i = 0; i < w2; i++)
            nonzero += moe_load_elem(s->dt, io->g_w2, l * w2 + i) != 0.0;
        if (routed ? nonzero == 0 : nonzero != 0) {
            fprintf(stderr, "rank %d: expert %d (%s) has %zu non-zero gradient elements\n",
                    wrank(), e, routed ? "routed" : "no tokens", nonzero);
            ok = false;
        }
    }
    return ok;
}

/* ------------------------------------------------------------------ one case ---- */

#define CHECKS(call)                                                                          \
    do {                                                                                      \
        moe_status s_ = (call);                                                               \
        if (s_ != MOE_OK) {                                                                   \
            fprintf(stderr, "rank %d: %s:%d: %s -> %s: %s\n", wrank(), __FILE__, __LINE__,    \
                    #call, moe_strerror(s_), moe_last_error());                               \
            ok = false;                                                                       \
        }                                                                                     \
    } while (0)

bool ept_case_run(const ept_case *c, ept_bits *bits)
{
    bool ok = true;
    MPI_Comm comm = c->self ? MPI_COMM_SELF : MPI_COMM_WORLD;
    int N = 1, me = 0;
    MPI_Comm_size(comm, &N);
    MPI_Comm_rank(comm, &me);
    const int V = c->V > 0 ? c->V : 1, C = c->C > 0 ? c->C : 1;
    int *cnt = calloc((size_t)N, sizeof(int)), *off = calloc((size_t)N + 1, sizeof(int));
    if (!cnt || !off) abort();
    ept_split(c->Tg, N, c->skewed, cnt, off);
    int64_t M = c->M;
    if (M < 0) {
        M = 1;
        for (int r = 0; r < N; r++) M = cnt[r] > M ? cnt[r] : M;
    }
    if (wrank() == 0)
        fprintf(stderr, "-- %s %s Tg=%d %s%s V=%d C=%d M=%lld%s%s%s route=%s on %d rank(s)\n",
                c->config, c->dt == MOE_NUM_DTYPES ? "(config dtype)" : moe_dtype_name(c->dt),
                c->Tg, c->skewed ? "skewed" : "even", c->self ? " self" : "", V, C,
                (long long)M, c->map ? " map" : "", c->async ? " async" : " host",
                c->dlogits ? " dlogits" : "", c->route ? c->route : "router", N);
    moe_ep_options o = MOE_EP_OPTIONS_INIT;
    o.transport = MOE_TRANSPORT_MPI;
    o.virtual_ranks = V;
    o.chunks = C;
    o.max_tokens_per_rank = M;
    o.route = c->route;
    moe_ep_comm *ec = NULL, *rc = NULL;
    moe_layer *L = NULL, *R = NULL;
    CHECKS(ept_comm_make(comm, &o, &ec));
    if (ec) CHECKS(ept_layer_make(c->config, c->dt, c->seed, ec, c->map, &L));
    if (c->ref_route) {
        moe_ep_options ro = MOE_EP_OPTIONS_INIT;
        ro.transport = MOE_TRANSPORT_MPI;
        ro.route = c->ref_route;
        CHECKS(ept_comm_make(MPI_COMM_SELF, &ro, &rc));
    }
    if (!c->ref_route || rc) CHECKS(ept_layer_make(c->config, c->dt, c->seed, rc, NULL, &R));
    ept_shape s, rs;
    if (ok) ok = ept_shape_of(L, &s) && ept_shape_of(R, &rs);
    /* the plain path (one rank, no virtual ranks, the router's routing) moves nothing */
    const char *tp = N == 1 && V == 1 && !c->route ? "none" : "mpi";
    if (ok && (s.nranks != N || s.V != V || rs.El != rs.E || strcmp(s.transport, tp) != 0)) {
        fprintf(stderr, "rank %d: layer info: %d ranks x %d virtual, transport %s (expected %s), "
                "reference %d of %d experts\n", wrank(), s.nranks, s.V, s.transport, tp, rs.El,
                rs.E);
        ok = false;
    }
    /* a local failure (the layers' own are agreed on) must not leave the others waiting */
    int mine = ok, all = 0;
    MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_LAND, comm);
    if (!all) goto out;
    {
        const int T = cnt[me], Tg = c->Tg, H = s.H, E = s.E, k = s.k;
        const size_t d = s.dsz;
        void *x = ept_global(s.dt, (size_t)Tg * H, c->seed, "test.ep.x");
        void *dout = ept_global(s.dt, (size_t)Tg * H, c->seed, "test.ep.dout");
        void *dlog = c->dlogits ? ept_global(s.dt, (size_t)Tg * E, c->seed, "test.ep.dlogits") : NULL;
        const char *xm = (const char *)x + (size_t)off[me] * H * d;
        const char *dm = (const char *)dout + (size_t)off[me] * H * d;
        const char *lm = dlog ? (const char *)dlog + (size_t)off[me] * E * d : NULL;
        int32_t *owner = malloc((size_t)E * 4), *vowner = malloc((size_t)E * 4),
                *vlocal = malloc((size_t)E * 4), *zero = calloc((size_t)E, 4);
        int32_t *ids = malloc(((size_t)T + 1) * k * 4), *ids_g = malloc(((size_t)Tg + 1) * k * 4);
        if (!owner || !vowner || !vlocal || !zero || !ids || !ids_g) abort();
        ept_placement(E, N, V, c->map, owner, vowner, vlocal);
        /* the layer holds the experts the placement gives this rank, ascending */
        int l = 0;
        for (int e = 0; e < E; e++)
            if (owner[e] == me) {
                if (l >= s.El || s.local[l] != e) ok = false;
                l++;
            }
        if (l != s.El || !ok) {
            fprintf(stderr, "rank %d: the layer holds %d experts, the placement gives it %d\n",
                    wrank(), s.El, l);
            ok = false;
        }
        const bool plain = N == 1 && V == 1 && !c->route, rplain = !c->ref_route;
        const int one[2] = {0, Tg};
        ept_io io, ref;
        ept_io_alloc(&s, T, &io);
        ept_io_alloc(&rs, Tg, &ref);
        /* forward */
        CHECKS(ept_forward(R, &rs, x, false, &ref));
        CHECKS(ept_forward(L, &s, xm, c->async, &io));
        ok &= ept_compare(comm, &s, &io, &rs, &ref, off[me], false, bits);
        if (c->ids_g) {
            memcpy(ids_g, c->ids_g, (size_t)Tg * k * 4);
        } else {
            /* the router's choice on this rank, and the reference's for the same tokens */
            int32_t *want = malloc(((size_t)T + 1) * k * 4);
            if (!want) abort();
            for (int t = 0; t < T; t++) {
                ept_topk_of_logits(s.dt, (const char *)io.logits + (size_t)t * E * d, E, k,
                                   ids + (size_t)t * k);
                ept_topk_of_logits(s.dt, (const char *)ref.logits + ((size_t)off[me] + t) * E * d,
                                   E, k, want + (size_t)t * k);
            }
            if (memcmp(ids, want, (size_t)T * k * 4) != 0) {
                fprintf(stderr, "rank %d: the EP layer routes its tokens differently\n", wrank());
                ok = false;
            }
            free(want);
            ept_gather_ids(comm, cnt, off, k, ids, ids_g);
        }
        ok &= ept_check_counters(L, &s, N, V, me, off, ids_g, vowner, 1, 1, plain ? 0 : C, plain);
        ok &= ept_check_counters(R, &rs, 1, 1, 0, one, ids_g, zero, 1, 1, rplain ? 0 : 1, rplain);
        CHECKS(moe_layer_stats_reset(L));
        CHECKS(moe_layer_stats_reset(R));
        /* backward */
        CHECKS(ept_backward(R, &rs, x, dout, dlog, false, &ref));
        CHECKS(ept_backward(L, &s, xm, dm, lm, c->async, &io));
        ok &= ept_compare(comm, &s, &io, &rs, &ref, off[me], true, bits);
        ok &= ept_check_counters(L, &s, N, V, me, off, ids_g, vowner, 2, 1, plain ? 0 : 1, plain);
        ok &= ept_check_counters(R, &rs, 1, 1, 0, one, ids_g, zero, 2, 1, rplain ? 0 : 1, rplain);
        ok &= ept_check_unrouted_zero(&s, &io, ids_g, Tg);
        if (c->check) ok &= c->check(c->check_arg, L, &s, &io, off[me], x, dout);
        ok &= ept_check_unrouted_zero(&rs, &ref, ids_g, Tg);
        ept_io_free(&io);
        ept_io_free(&ref);
        free(x);
        free(dout);
        free(dlog);
        free(owner);
        free(vowner);
        free(vlocal);
        free(zero);
        free(ids);
        free(ids_g);
    }
out:
    CHECKS(moe_layer_destroy(L));
    CHECKS(moe_layer_destroy(R));
    CHECKS(moe_ep_comm_destroy(ec));
    CHECKS(moe_ep_comm_destroy(rc));
    free(cnt);
    free(off);
    return ok;
}

void ept_bits_report(const char *what, const ept_bits *b)
{
    uint64_t in[6] = {b->out_diff, b->out_n, b->dx_diff, b->dx_n, b->rep_diff, b->rep_n}, s[6];
    MPI_Allreduce(in, s, 6, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    if (wrank() == 0)
        fprintf(stderr, "== %s, fp32 cases: elements not bitwise equal to the single-rank layer's: forward out "
                "%llu of %llu, dx %llu of %llu, router/shared gradients %llu of %llu (expert "
                "gradients: bitwise, asserted)\n", what, (unsigned long long)s[0],
                (unsigned long long)s[1], (unsigned long long)s[2], (unsigned long long)s[3],
                (unsigned long long)s[4], (unsigned long long)s[5]);
}
