/* cli_check_ep.c — `moe-ep check` expert-parallel: the layer over MPI_COMM_WORLD (each rank its
 * slice of the tokens, in contiguous slices as if they arrived data-parallel after attention)
 * against the single-rank layer on the whole batch, on the same generated weights and inputs;
 * each rank compares its rows (and, with --backward, its experts' gradients and the replicated
 * ones). Both backends run through the same public calls. Every rank makes every collective
 * call in the same order, and the ranks first agree on the check's own options (a rank
 * launched with other ones fails every rank, naming the option). */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "cli_check.h"
#include "cli_layer.h"
#include "config.h"
#include "cpu/cpu_fused.h"
#include "dtype.h"
#include "ep/ep.h"
#include "rng.h"

/* The stage rule of check.h (global relative error <= tol, worst row <= 10*tol, a zero
 * reference row exactly zero, no NaN/Inf) on local rows [0, n) of `got` against rows
 * [off, off+n) of a global [*, cols] reference, both in dt and read in place (one
 * Llama-4-Scout expert-gradient tensor is 2.7 GB: it is never copied to doubles). Rows with
 * skip[i] set are left out (and not counted in "compared"). */
static void cmp_rows_skip(moe_check_report *rep, const char *stage, moe_dtype dt, const void *got,
                          const void *ref_all, int off, int n, int cols, double tol,
                          const bool *skip)
{
    if (rep->count >= MOE_CHECK_MAX_ROWS) { /* no room to report it: never a silent pass */
        rep->all_pass = false;
        return;
    }
    moe_check_row *row = &rep->rows[rep->count++];
    memset(row, 0, sizeof *row);
    int used = 0;
    for (int i = 0; i < n; i++) used += !(skip && skip[i]);
    snprintf(row->stage, sizeof row->stage, "%s", stage);
    snprintf(row->compared, sizeof row->compared, "%d rows x %d", used, cols);
    row->worst_row = -1;
    bool nan = false, zero_bad = false;
    double num = 0, den = 0;
    /* Per-row sums in parallel over rows (one parallel region per stage: a region per row
     * stalls when the cores are shared), each row summed in order; then the rows in order. */
    double *rn = malloc(2 * sizeof(double) * ((size_t)n + 1));
    unsigned char *rnan = calloc((size_t)n + 1, 1);
    if (!rn || !rnan) {
        free(rn);
        free(rnan);
        snprintf(row->note, sizeof row->note, "out of memory comparing");
        row->pass = false;
        rep->all_pass = false;
        return;
    }
    double *rd = rn + n;
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; i++) {
        rn[i] = rd[i] = 0;
        if (skip && skip[i]) continue;
        const size_t g0 = (size_t)i * cols, r0 = ((size_t)off + i) * cols;
        double a_n = 0, a_d = 0;
        unsigned char bad = 0;
        for (size_t q = 0; q < (size_t)cols; q++) {
            double a = moe_load_elem(dt, got, g0 + q), b = moe_load_elem(dt, ref_all, r0 + q);
            if (isnan(a) || isnan(b) || isinf(a)) bad = 1;
            a_n += (a - b) * (a - b);
            a_d += b * b;
        }
        rn[i] = a_n;
        rd[i] = a_d;
        rnan[i] = bad;
    }
    for (int i = 0; i < n; i++) {
        if (skip && skip[i]) continue;
        num += rn[i];
        den += rd[i];
        double e = rd[i] == 0 ? (rn[i] == 0 ? 0 : INFINITY) : sqrt(rn[i] / rd[i]);
        if (rd[i] == 0 && rn[i] != 0) zero_bad = true;
        if (rnan[i]) nan = true;
        if (e > row->worst_err || row->worst_row < 0 || rnan[i]) {
            if (e > row->worst_err || row->worst_row < 0) row->worst_err = e;
            row->worst_row = i;
        }
    }
    free(rn);
    free(rnan);
    row->rel_err = den == 0 ? (num == 0 ? 0 : INFINITY) : sqrt(num / den);
    row->tol = tol;
    row->pass = !nan && !zero_bad && row->rel_err <= tol && row->worst_err <= 10 * tol;
    if (nan) snprintf(row->note, sizeof row->note, "NaN/Inf present (unwritten or overflow)");
    else if (zero_bad) snprintf(row->note, sizeof row->note, "a zero reference row is not zero");
    if (!row->pass) rep->all_pass = false;
}

static void cmp_rows(moe_check_report *rep, const char *stage, moe_dtype dt, const void *got,
                     const void *ref_all, int off, int n, int cols, double tol)
{
    cmp_rows_skip(rep, stage, dt, got, ref_all, off, n, cols, tol, NULL);
}

/* Whether two top-k id sets (k each) hold the same experts. */
static bool same_set(const int32_t *a, const int32_t *b, int k)
{
    for (int i = 0; i < k; i++) {
        bool found = false;
        for (int j = 0; j < k && !found; j++) found = a[i] == b[j];
        if (!found) return false;
    }
    return true;
}

/* A token the EP routed to other experts than the reference is acceptable only as a near-tie:
 * every expert chosen by one side only must have a reference logit within the logits'
 * tolerance of every expert chosen by the other side only. */
static bool near_tie(moe_dtype dt, const void *ref_logits, size_t row, int E, const int32_t *a,
                     const int32_t *b, int k, double tol)
{
    for (int i = 0; i < k; i++) {
        bool in_b = false;
        for (int j = 0; j < k; j++) in_b |= a[i] == b[j];
        if (in_b) continue;
        for (int j = 0; j < k; j++) {
            bool in_a = false;
            for (int q = 0; q < k; q++) in_a |= b[j] == a[q];
            if (in_a) continue;
            double la = moe_load_elem(dt, ref_logits, row * E + (size_t)a[i]);
            double lb = moe_load_elem(dt, ref_logits, row * E + (size_t)b[j]);
            double scale = fmax(1.0, fmax(fabs(la), fabs(lb)));
            if (fabs(la - lb) > tol * scale) return false;
        }
    }
    return true;
}


/* all-to-one:R names experts by the EP placement; the one-rank reference gets them spelled
 * out (experts:ID,...) so both route the same tokens to the same experts. */
static int spell_all_to_one(const cli_layer_args *la, const moe_config *cfg, const int32_t *owner,
                            int size, char *out, size_t len)
{
    moe_ep_route r;
    moe_error e = {0};
    moe_expert_map m;
    if (moe_ep_route_parse(la->route, cfg->num_experts, cfg->top_k, &r, &e) != MOE_OK) return 1;
    if (r.mode != MOE_EP_ROUTE_ALL_TO_ONE) {
        snprintf(out, len, "%s", la->route);
        moe_ep_route_free(&r);
        return 0;
    }
    int32_t ids[64];
    int rc = cfg->top_k > 64 ||
             moe_expert_map_build(cfg->num_experts, size, la->virtual_ranks, 0, owner, &m, &e) != MOE_OK ||
             moe_ep_route_ids(&r, &m, cfg->top_k, 0, 1, ids, &e) != MOE_OK;
    if (!rc) {
        int n = snprintf(out, len, "experts:");
        for (int j = 0; j < cfg->top_k; j++) n += snprintf(out + n, len - (size_t)n, "%s%d", j ? "," : "", ids[j]);
        const char *w = strstr(la->route, ",w=");
        if (w) snprintf(out + n, len - (size_t)n, "%s", w);
        moe_expert_map_free(&m);
    }
    moe_ep_route_free(&r);
    return rc;
}

/* The single-rank reference's layer options: all experts on one rank; forced routing (which
 * only the EP path knows) through a communicator of this process alone. */
static int reference_layer(const cli_check_args *c, const cli_layer_args *la,
                           const moe_config *cfg, const int32_t *owner, int size,
                           const moe_layer_options *lo, moe_layer **L, moe_ep_comm **self)
{
    moe_layer_options o = *lo;
    o.comm = NULL;
    o.expert_map = NULL;
    o.max_tokens = c->tokens;
    *self = NULL;
    char route[512];
    if (la->route) {
        if (spell_all_to_one(la, cfg, owner, size, route, sizeof route)) {
            fprintf(stderr, "moe-ep check: --route %s: cannot place it\n", la->route);
            return 2;
        }
        moe_ep_options eo = MOE_EP_OPTIONS_INIT;
        eo.transport = MOE_TRANSPORT_MPI;
        eo.route = route;
        moe_status st = moe_ep_comm_create((int32_t)MPI_Comm_c2f(MPI_COMM_SELF), &eo, self);
        if (st != MOE_OK) return cli_api_fail("check", st);
        o.comm = *self;
    }
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    src.kind = MOE_WEIGHTS_RANDOM;
    src.seed = c->seed;
    moe_status st = moe_layer_create(c->model, &src, &o, L);
    return st == MOE_OK ? 0 : cli_api_fail("check", st);
}

/* What a layer produced on the host: out [n,H], logits [n,E], and with backward dx and the
 * gradients (router [E,H], its El experts' w13 and w2, the shared expert). */
typedef struct run_out {
    void *out, *logits, *dx;
    moe_layer_grads g;
    double t_fwd, t_bwd;
} run_out;

static void run_out_free(run_out *r)
{
    void *p[] = {r->out, r->logits, r->dx, r->g.router, r->g.w13, r->g.w2, r->g.shared_gate,
                 r->g.shared_up, r->g.shared_down};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
    memset(r, 0, sizeof *r);
}

/* Forward (and backward) of layer L on n tokens; outputs poisoned first (all bits set: NaN in
 * every float dtype) so an unwritten element fails. Collective when L is expert-parallel. */
static moe_status run_layer(moe_layer *L, const moe_config *cfg, moe_dtype dt, int n,
                            const void *x, const void *dout, bool backward, run_out *r)
{
    moe_layer_info in = MOE_LAYER_INFO_INIT;
    moe_layer_info_get(L, &in);
    const size_t esz = moe_dtype_size(dt), H = (size_t)cfg->hidden, E = (size_t)cfg->num_experts;
    const size_t I = (size_t)cfg->inter, Is = (size_t)cfg->shared_inter, El = (size_t)in.num_local_experts;
    memset(r, 0, sizeof *r);
    r->out = malloc((size_t)n * H * esz + 1);
    r->logits = malloc((size_t)n * E * esz + 1);
    if (!r->out || !r->logits) return MOE_ERR_NOMEM;
    memset(r->out, 0xff, (size_t)n * H * esz);
    memset(r->logits, 0xff, (size_t)n * E * esz);
    moe_tensor_view vx = {dt, 2, {n, (int64_t)H}, (void *)x};
    moe_tensor_view vo = {dt, 2, {n, (int64_t)H}, r->out}, vl = {dt, 2, {n, (int64_t)E}, r->logits};
    double t0 = moe_now();
    moe_status st = moe_layer_forward(L, &vx, &vo, &vl);
    if (st == MOE_OK) st = moe_layer_check_errors(L); /* a sync-free overflow, NaN logits */
    r->t_fwd = moe_now() - t0;
    if (st != MOE_OK || !backward) return st;
    r->dx = malloc((size_t)n * H * esz + 1);
    size_t gb[6] = {E * H * esz, El * 2 * I * H * esz, El * H * I * esz, Is * H * esz,
                    Is * H * esz, H * Is * esz};
    void **gp[6] = {&r->g.router, &r->g.w13, &r->g.w2, &r->g.shared_gate, &r->g.shared_up,
                    &r->g.shared_down};
    for (int i = 0; i < 6; i++) {
        if (i >= 3 && Is == 0) continue;
        *gp[i] = malloc(gb[i] + 1);
        if (!*gp[i]) return MOE_ERR_NOMEM;
        memset(*gp[i], 0xff, gb[i]); /* every element must be written: zeros for idle experts */
    }
    memset(r->dx, 0xff, (size_t)n * H * esz);
    moe_tensor_view vd = {dt, 2, {n, (int64_t)H}, (void *)dout}, vdx = {dt, 2, {n, (int64_t)H}, r->dx};
    t0 = moe_now();
    st = moe_layer_backward(L, &vx, &vd, NULL, &vdx, &r->g);
    r->t_bwd = moe_now() - t0;
    return st;
}

/* The top-k ids of logits (the routing is a pure function of them): the CPU twin's rule. */
static int32_t *ids_of(const moe_config *cfg, moe_dtype dt, int n, const void *logits)
{
    int32_t *ids = malloc(((size_t)n * cfg->top_k + 1) * sizeof *ids);
    void *w = malloc(((size_t)n * cfg->top_k + 1) * moe_dtype_size(dt));
    moe_error e = {0};
    if (!ids || !w || cpu_route_topk(cfg, dt, n, logits, ids, w, &e) != MOE_OK) {
        free(ids);
        ids = NULL;
    }
    free(w);
    return ids;
}

/* Rows `ids` [n] of a [*, cols] tensor, contiguous (the reference's rows of this rank's
 * experts, which need not be contiguous). */
static void *pick_rows(const void *all, const int32_t *ids, int n, size_t row_bytes)
{
    char *p = malloc((size_t)n * row_bytes + 1);
    for (int i = 0; p && i < n; i++)
        memcpy(p + (size_t)i * row_bytes, (const char *)all + (size_t)ids[i] * row_bytes, row_bytes);
    return p;
}

int cli_check_ep(const cli_check_args *c, const cli_layer_args *la)
{
    int rank, size;
    cli_mpi_begin(&rank, &size);
    moe_error err = {0};
    moe_config cfg;
    int rc = 0;
    if (moe_config_resolve(c->model, &cfg, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep check: --model: %s\n", err.msg);
        rc = 2;
    }
    moe_layer_options lo;
    moe_dtype dt = MOE_DTYPE_F32;
    if (!rc) rc = cli_layer_options("check", la, &cfg, &lo, &dt);
    /* the check's own options must be the same everywhere (a global batch, one comparison);
     * the model field by field, so a mismatch names the field */
    enum { NF = 13 };
    int64_t f[NF] = {0};
    if (!rc) {
        const int64_t v[NF] = {c->tokens, c->backward, (int64_t)(c->seed >> 32),
                               (int64_t)(c->seed & 0xffffffffu), dt, cfg.arch, cfg.hidden,
                               cfg.inter, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob,
                               cfg.shared_inter, cfg.dtype};
        memcpy(f, v, sizeof f);
    }
    static const char *const names[NF] = {
        "--tokens", "--backward", "--seed (high 32 bits)", "--seed (low 32 bits)", "--dtype",
        "--model: the model type (arch)", "--model: hidden_size", "--model: the expert width (I)",
        "--model: the number of experts", "--model: top-k (num_experts_per_tok)",
        "--model: norm_topk_prob", "--model: the shared expert's width",
        "--model: torch_dtype"};
    moe_status ag = ep_agree_fields(MPI_COMM_WORLD, rc ? MOE_ERR_INVALID_ARG : MOE_OK, f, names, NF, &err);
    if (ag != MOE_OK) {
        if (!rc) fprintf(stderr, "moe-ep check: %s\n", err.msg);
        return cli_mpi_end(2);
    }
    /* every rank holds the whole batch's inputs and runs the single-rank reference on it: a
     * huge --tokens is refused before anything is allocated */
    rc = cli_host_memory_check("check", "--tokens", c->tokens,
                               "the check's tensors for that many tokens (on every rank)",
                               cli_check_token_bytes(&cfg, dt, c->tokens, c->backward));
    if ((rc = cli_agree(rc))) return cli_mpi_end(rc);
    const int T = c->tokens, H = cfg.hidden, E = cfg.num_experts, I = cfg.inter, k = cfg.top_k;
    const int Is = cfg.shared_inter;
    const size_t esz = moe_dtype_size(dt);
    int Tr, off;
    cli_split(T, size, rank, &Tr, &off);
    moe_ep_comm *comm = NULL, *self = NULL;
    int32_t *owner = NULL, *ep_ids = NULL, *ref_ids = NULL, *local = NULL;
    moe_layer *L = NULL, *R = NULL;
    run_out ep, ref;
    memset(&ep, 0, sizeof ep);
    memset(&ref, 0, sizeof ref);
    bool *skip = NULL;
    void *rw13 = NULL, *rw2 = NULL;
    moe_check_report rep;
    moe_check_report_init(&rep);
    moe_layer_info in = MOE_LAYER_INFO_INIT;
    /* the same global tensors as the single-rank check: any slice is generated identically */
    void *x_all = malloc((size_t)T * H * esz + 1), *dout_all = malloc((size_t)T * H * esz + 1);
    if (!x_all || !dout_all) {
        fprintf(stderr, "moe-ep check: out of memory\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    moe_fill_normal(dt, x_all, (size_t)T * H, c->seed, "hidden_states", 0, 1.0);
    moe_fill_normal(dt, dout_all, (size_t)T * H, c->seed, "grad_output", 0, 1.0);
    const char *x = (const char *)x_all + (size_t)off * H * esz;
    const char *dout = (const char *)dout_all + (size_t)off * H * esz;

    if ((rc = cli_ep_open("check", la, E, &comm, &owner))) goto done;
    lo.comm = comm;
    lo.expert_map = owner;
    lo.max_tokens = la->max_tokens_per_rank > 0 ? la->max_tokens_per_rank : 0;
    moe_weights_source src = MOE_WEIGHTS_SOURCE_INIT;
    src.kind = MOE_WEIGHTS_RANDOM;
    src.seed = c->seed;
    double t0 = moe_now();
    moe_status st = moe_layer_create(c->model, &src, &lo, &L);
    if (st != MOE_OK) {
        rc = cli_api_fail("check", st); /* every rank got the same status */
        goto done;
    }
    moe_layer_info_get(L, &in);
    /* the layer's list goes with it: keep a copy */
    local = malloc(((size_t)in.num_local_experts + 1) * sizeof *local);
    if (!local) MPI_Abort(MPI_COMM_WORLD, 1);
    memcpy(local, in.local_experts, (size_t)in.num_local_experts * sizeof *local);
    in.local_experts = local;
    if (rank == 0) {
        printf("moe-ep check: %s H=%d I=%d E=%d k=%d, T=%d over %d ranks (x%d virtual, transport "
               "%s, %d chunks), dtype %s, seed %llu: expert-parallel vs the single-rank fused path\n",
               cfg.name, H, I, E, k, T, size, in.virtual_ranks, in.transport, la->chunks,
               moe_dtype_name(dt), (unsigned long long)c->seed);
        printf("moe-ep check: %s%s; weights generated and placed in %.1f s\n",
               in.backend == MOE_BACKEND_CPU ? "" : "cuda: ", in.device_name, moe_now() - t0);
        if (la->route)
            printf("moe-ep check: forced routing: compared against the single-rank EP path (V=1, N=1)\n");
        fflush(stdout);
    }
    st = run_layer(L, &cfg, dt, Tr, x, dout, c->backward, &ep);
    if (st != MOE_OK) rc = cli_api_fail("check", st);
    if ((rc = cli_agree(rc))) goto done;
    if (la->stats) cli_print_ep_stats(L, rank, size);
    /* a rank holds its slice or all experts on the device, never both */
    moe_layer_destroy(L);
    L = NULL;

    t0 = moe_now();
    if (!(rc = reference_layer(c, la, &cfg, owner, size, &lo, &R, &self))) {
        st = run_layer(R, &cfg, dt, T, x_all, dout_all, c->backward, &ref);
        if (st != MOE_OK) rc = cli_api_fail("check", st);
    }
    double t_ref = moe_now() - t0;
    if ((rc = cli_agree(rc))) goto done;
    if (rank == 0) {
        printf("moe-ep check: rank 0: EP forward %.3f s%s", ep.t_fwd, c->backward ? "" : "; ");
        if (c->backward) printf(", backward %.3f s; ", ep.t_bwd);
        printf("single-rank reference (weights, run) %.1f s\n", t_ref);
        fflush(stdout);
    }

    /* stages */
    const double tol = moe_check_tol(dt, false), tg = moe_check_tol(dt, true);
    cmp_rows(&rep, "router logits", dt, ep.logits, ref.logits, off, Tr, E, tol);
    ep_ids = ids_of(&cfg, dt, Tr, ep.logits);
    ref_ids = ids_of(&cfg, dt, T, ref.logits);
    skip = calloc((size_t)Tr + 1, sizeof(bool));
    int ndiff = 0, nbad = 0;
    for (int t = 0; t < Tr && skip && ep_ids && ref_ids && !la->route; t++) {
        const int32_t *a = ep_ids + (size_t)t * k, *b = ref_ids + ((size_t)off + t) * k;
        if (same_set(a, b, k)) continue;
        skip[t] = true;
        ndiff++;
        if (!near_tie(dt, ref.logits, (size_t)off + t, E, a, b, k, tol)) nbad++;
    }
    char note[96] = "";
    int ntie = ndiff - nbad, tie_cap = Tr / 50 > 1 ? Tr / 50 : 1;
    if (ntie > 0)
        snprintf(note, sizeof note, "%d near-tie token%s (logits within tol) left out%s", ntie,
                 ntie == 1 ? "" : "s", ntie > tie_cap ? ": more than 2%" : "");
    char what[40];
    snprintf(what, sizeof what, "%d tokens x %d", Tr, k);
    if (!ep_ids || !ref_ids) moe_check_exact(&rep, "routing (top-k ids)", "not computed", 1, 1, "out of memory");
    else moe_check_exact(&rep, "routing (top-k ids)", what, Tr, nbad + (ntie > tie_cap ? ntie : 0), note);
    cmp_rows_skip(&rep, "output", dt, ep.out, ref.out, off, Tr, H, tol, skip);
    if (c->backward) {
        cmp_rows_skip(&rep, "grad hidden_states", dt, ep.dx, ref.dx, off, Tr, H, tg, skip);
        int all = 0;
        MPI_Allreduce(&ndiff, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
        const int El = in.num_local_experts;
        if (all > 0) {
            /* a token routed to other experts changes every weight gradient it touches */
            moe_check_exact(&rep, "weight gradients", "not compared", 0, 0,
                            "tokens routed differently (near-tie) on some rank");
        } else {
            cmp_rows(&rep, "grad router", dt, ep.g.router, ref.g.router, 0, E, H,
                     dt == MOE_DTYPE_F32 ? tg : 2.5 * tg);
            /* this rank's experts (ascending ids, maybe not contiguous) in the reference */
            rw13 = pick_rows(ref.g.w13, in.local_experts, El, 2 * (size_t)I * H * esz);
            rw2 = pick_rows(ref.g.w2, in.local_experts, El, (size_t)H * I * esz);
            if (El > 0) {
                cmp_rows(&rep, "grad gate_up (per expert)", dt, ep.g.w13, rw13, 0, El, 2 * I * H, tg);
                cmp_rows(&rep, "grad down (per expert)", dt, ep.g.w2, rw2, 0, El, H * I, tg);
            }
            if (Is > 0) {
                cmp_rows(&rep, "grad shared gate", dt, ep.g.shared_gate, ref.g.shared_gate, 0, 1, Is * H, tg);
                cmp_rows(&rep, "grad shared up", dt, ep.g.shared_up, ref.g.shared_up, 0, 1, Is * H, tg);
                cmp_rows(&rep, "grad shared down", dt, ep.g.shared_down, ref.g.shared_down, 0, 1, H * Is, tg);
            }
        }
    }
    for (int r = 0; r < size; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        if (r == rank) {
            printf("\nrank %d of %d: tokens [%d, %d), %d experts", rank, size, off, off + Tr,
                   in.num_local_experts);
            for (int i = 0; i < in.num_local_experts && i < 16; i++)
                printf("%s%d", i ? "," : " [", in.local_experts[i]);
            printf("%s\n", in.num_local_experts > 16 ? ",...]" : in.num_local_experts ? "]" : "");
            moe_check_print(&rep, stdout);
            fflush(stdout);
        }
    }
    rc = cli_agree(rep.all_pass ? 0 : 1);
    if (rank == 0) {
        bool grads_skipped = false;
        for (int i = 0; i < rep.count; i++)
            grads_skipped |= strcmp(rep.rows[i].stage, "weight gradients") == 0;
        printf("\nmoe-ep check: %s on all %d ranks%s\n", rc ? "FAIL" : "PASS", size,
               grads_skipped ? " (weight gradients NOT compared: tokens routed differently at near-ties)" : "");
    }
done:
    moe_layer_destroy(L);
    moe_layer_destroy(R);
    moe_ep_comm_destroy(comm);
    moe_ep_comm_destroy(self);
    run_out_free(&ep);
    run_out_free(&ref);
    free(owner);
    free(local);
    free(ep_ids);
    free(ref_ids);
    free(skip);
    free(rw13);
    free(rw2);
    free(x_all);
    free(dout_all);
    return cli_mpi_end(rc);
}
