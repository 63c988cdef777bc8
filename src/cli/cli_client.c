/* cli_client.c — `moe-ep client` (talk to `moe-ep serve`: forward a safetensors file, INFO,
 * STATS, SHUTDOWN; a verifying load generator; malformed frames for testing a server) and
 * `moe-ep gen-input` (random hidden states for tests and benchmarks). */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <omp.h>

#include "block_state.h"
#include "cli.h"
#include "cli_opts.h"
#include "client/moe_client.h"
#include "client/moe_net.h"
#include "client/moe_proto.h"
#include "config.h"
#include "dtype.h"
#include "rng.h"
#include "safetensors.h"
#include "service/svc.h"
#include "weights.h"

/* ---------------------------------------------------------------- helpers ---- */

static bool opt_seen(const cli_opt *opts, const char *name)
{
    for (const cli_opt *o = opts; o->name; o++)
        if (strcmp(o->name, name) == 0) return o->seen;
    return false;
}

/* hidden_states [T,H] or [B,S,H] of a file, converted to dt; *shape keeps the file's shape. */
static moe_status read_hidden(const char *path, int H, moe_dtype dt, void **out, int *T,
                              moe_tensor *shape, moe_error *err)
{
    moe_st_file f;
    MOE_TRY(moe_st_open(path, &f, err));
    moe_tensor v;
    moe_status st = moe_st_get(&f, "hidden_states", &v, err);
    if (st == MOE_OK && ((v.ndim != 2 && v.ndim != 3) || v.shape[v.ndim - 1] != H || !moe_dtype_is_float(v.dtype))) {
        char buf[64];
        st = moe_fail(err, MOE_ERR_FORMAT, "%s: hidden_states is %s %s; expected a float [T, %d] or [B, S, %d]",
                      path, moe_dtype_name(v.dtype), moe_shape_str(v.ndim, v.shape, buf, sizeof buf), H, H);
    }
    if (st == MOE_OK) {
        size_t n = moe_tensor_numel(&v);
        if (n / (size_t)H > 0x7fffffff) st = moe_fail(err, MOE_ERR_FORMAT, "%s: too many rows", path);
        else {
            *T = (int)(n / (size_t)H);
            *out = moe_malloc(n * moe_dtype_size(dt) + 1, "hidden_states", err);
            if (!*out) st = MOE_ERR_NOMEM;
            else {
                moe_tensor dst = moe_tensor_view_of(dt, v.ndim, v.shape, *out);
                st = moe_tensor_convert(&v, &dst, err);
                *shape = moe_tensor_view_of(dt, v.ndim, v.shape, NULL);
            }
        }
    }
    moe_st_close(&f);
    return st;
}

static void print_info(const moe_client_info *in)
{
    printf("model %s (%s), backend %s, %d rank(s)\n", in->model, in->arch ? "llama4" : "qwen3",
           in->backend, in->nranks);
    printf("hidden %d, experts %d, top-k %d, expert width %d, shared width %d, dtype %s\n",
           in->hidden, in->num_experts, in->top_k, in->inter, in->shared_inter,
           moe_dtype_name(in->dtype) ? moe_dtype_name(in->dtype) : "?");
    printf("max tokens per request %d, batching wait %d us\nlayers:", in->max_tokens, in->max_wait_us);
    for (int i = 0; i < in->nlayers; i++) printf(" %d", (int)in->layers[i]);
    printf("\n");
}

static void print_stats(const moe_client_stats *s)
{
    printf("uptime_us %" PRIu64 "\nrequests_ok %" PRIu64 "\nrequests_failed %" PRIu64
           "\ntokens %" PRIu64 "\nbatches %" PRIu64 "\nbatch_tokens_max %" PRIu64
           "\nqueue_depth %" PRIu64 "\nqueue_tokens %" PRIu64 "\nconnections_open %" PRIu64
           "\nconnections_total %" PRIu64 "\nconnections_rejected %" PRIu64
           "\nconnections_timed_out %" PRIu64 "\nbytes_in_flight %" PRIu64
           "\nlatency_samples %" PRIu64 "\nlatency_p50_us %" PRIu64 "\nlatency_p90_us %" PRIu64
           "\nlatency_p99_us %" PRIu64 "\nlatency_max_us %" PRIu64 "\n",
           s->uptime_us, s->requests_ok, s->requests_failed, s->tokens, s->batches,
           s->batch_tokens_max, s->queue_depth, s->queue_tokens, s->connections_open,
           s->connections_total, s->connections_rejected, s->connections_timed_out,
           s->bytes_in_flight, s->latency_samples, s->latency_p50_us, s->latency_p90_us,
           s->latency_p99_us, s->latency_max_us);
    for (int i = 1; i < MOE_CLIENT_STATUS_SLOTS; i++)
        if (s->errors[i]) printf("errors.%d %" PRIu64 " (%s)\n", i, s->errors[i], moe_strerror((moe_status)i));
}

/* The per-row tolerance a load check uses when none is given: bit for bit when the experts
 * are replicated (the row-independent fused path); with expert parallelism (INFO backend
 * "...+ep") each owner's partial sum is rounded before the combine, so 10x docs/DESIGN.md's global
 * tolerance of the dtype, its per-row bound. */
static double auto_tol(const moe_client_info *in)
{
    if (!strstr(in->backend, "+ep")) return 0;
    switch (in->dtype) {
    case MOE_DTYPE_BF16: return 1e-1;
    case MOE_DTYPE_F16: return 1e-2;
    default: return 1e-4;
    }
}

/* ---------------------------------------------------------------- forward a file ---- */

static int forward_file(moe_client *c, const moe_client_info *in, const char *input,
                        const char *output, int layer, bool logits)
{
    moe_error err = {0};
    void *x = NULL;
    int T = 0;
    moe_tensor shape;
    const int H = in->hidden, E = in->num_experts;
    if (read_hidden(input, H, in->dtype, &x, &T, &shape, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep client: %s\n", err.msg);
        return 1;
    }
    size_t esz = moe_dtype_size(in->dtype);
    uint8_t *out = malloc((size_t)T * H * esz + 1), *lg = logits ? malloc((size_t)T * E * esz + 1) : NULL;
    if (!out || (logits && !lg)) {
        fprintf(stderr, "moe-ep client: out of memory\n");
        free(x); free(out); free(lg);
        return 1;
    }
    /* Requests of at most the server's per-request limit; rows are independent. */
    int chunk = in->max_tokens > 0 ? in->max_tokens : T, nreq = 0;
    for (int t0 = 0; t0 < T; t0 += chunk, nreq++) {
        int n = MOE_MIN(chunk, T - t0);
        moe_status st = moe_client_forward(c, layer, in->dtype, n, H, (uint8_t *)x + (size_t)t0 * H * esz,
                                           out + (size_t)t0 * H * esz,
                                           lg ? lg + (size_t)t0 * E * esz : NULL, lg ? E : 0);
        if (st != MOE_OK) {
            fprintf(stderr, "moe-ep client: rows %d..%d: %s\n", t0, t0 + n, moe_client_last_error(c));
            free(x); free(out); free(lg);
            return 1;
        }
    }
    moe_st_writer wr;
    moe_st_writer_init(&wr);
    moe_tensor ot = moe_tensor_view_of(in->dtype, shape.ndim, shape.shape, out);
    int64_t ls[2] = {T, E};
    moe_tensor lt = moe_tensor_view_of(in->dtype, 2, ls, lg);
    moe_status st = moe_st_writer_add(&wr, "output", &ot, &err);
    if (st == MOE_OK && lg) st = moe_st_writer_add(&wr, "router_logits", &lt, &err);
    if (st == MOE_OK) st = moe_st_write(&wr, output, &err);
    moe_st_writer_free(&wr);
    free(x); free(out); free(lg);
    if (st != MOE_OK) {
        fprintf(stderr, "moe-ep client: %s\n", err.msg);
        return 1;
    }
    printf("moe-ep client: %d tokens of layer %d in %d request(s) -> %s (output%s)\n", T, layer,
           nreq, output, logits ? ", router_logits" : "");
    return 0;
}

/* ---------------------------------------------------------------- load generator ---- */

/* Each request takes T random rows of a pool whose expected outputs were computed here, in
 * process, by the engine on the same weights; every reply row must equal its pool row's
 * expected output exactly (the CPU fused path computes a row independently of the others it
 * is batched with) or within --tol. So a lost, duplicated or misplaced row is caught. */
typedef struct load_ctx {
    const char *addr;
    int layer, requests, max_T, fixed_T;
    uint64_t seed;
    int H, E, pool;
    moe_dtype dt;
    double tol;
    const uint8_t *px, *pout, *plog; /* pool rows, expected output and logits rows */
    double rate;                     /* requests/s per client (0: back to back) */
    double t_start;
} load_ctx;

typedef struct load_thread {
    load_ctx *lc;
    int id;
    pthread_t th;
    uint64_t ok, errors, mismatched_rows, tokens;
    double *lat; /* seconds, one per request */
    int nlat;
    char first_error[400];
} load_thread;

static bool rows_equal(moe_dtype dt, const uint8_t *a, const uint8_t *b, int n, double tol)
{
    if (tol <= 0) return memcmp(a, b, (size_t)n * moe_dtype_size(dt)) == 0;
    double d2 = 0, r2 = 0;
    for (int i = 0; i < n; i++) {
        double x = moe_load_elem(dt, a, (size_t)i), y = moe_load_elem(dt, b, (size_t)i);
        if (x != x) return false;
        d2 += (x - y) * (x - y);
        r2 += y * y;
    }
    return r2 == 0 ? d2 == 0 : d2 <= tol * tol * r2;
}

static void sleep_until(double t)
{
    for (;;) {
        double left = t - moe_now();
        if (left <= 0) return;
        struct timespec ts = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
        nanosleep(&ts, NULL);
    }
}

static void *load_main(void *arg)
{
    load_thread *lt = arg;
    load_ctx *lc = lt->lc;
    size_t esz = moe_dtype_size(lc->dt), rh = (size_t)lc->H * esz, re = (size_t)lc->E * esz;
    uint8_t *x = malloc((size_t)lc->max_T * rh), *out = malloc((size_t)lc->max_T * rh);
    uint8_t *lg = malloc((size_t)lc->max_T * re);
    int *idx = malloc((size_t)lc->max_T * sizeof *idx);
    moe_client *c = moe_client_new();
    if (!x || !out || !lg || !idx || !c) {
        snprintf(lt->first_error, sizeof lt->first_error, "out of memory");
        lt->errors = (uint64_t)lc->requests;
        goto done;
    }
    if (moe_client_connect(c, lc->addr) != MOE_OK) {
        snprintf(lt->first_error, sizeof lt->first_error, "%s", moe_client_last_error(c));
        lt->errors = (uint64_t)lc->requests;
        goto done;
    }
    uint64_t stream = moe_rng_stream(lc->seed, "client.load.requests");
    for (int r = 0; r < lc->requests; r++) {
        uint64_t base = ((uint64_t)lt->id << 40) + (uint64_t)r * 4096;
        int T = lc->fixed_T > 0 ? lc->fixed_T
                                : 1 + (int)(moe_rng_u64(stream, base) % (uint64_t)lc->max_T);
        bool want_logits = (r & 1) != 0;
        for (int t = 0; t < T; t++) {
            idx[t] = (int)(moe_rng_u64(stream, base + 1 + (uint64_t)t) % (uint64_t)lc->pool);
            memcpy(x + (size_t)t * rh, lc->px + (size_t)idx[t] * rh, rh);
        }
        /* NaN-poison so a row the server never wrote cannot pass. */
        for (size_t i = 0; i < (size_t)T * lc->H; i++) moe_store_elem_f(lc->dt, out, i, NAN);
        for (size_t i = 0; i < (size_t)T * lc->E; i++) moe_store_elem_f(lc->dt, lg, i, NAN);
        double sched = moe_now();
        if (lc->rate > 0) { /* open loop: request r is due at a fixed time, late or not */
            sched = lc->t_start + (r + (double)lt->id / 7.0) / lc->rate;
            sleep_until(sched);
        }
        moe_status st = moe_client_forward(c, lc->layer, lc->dt, T, lc->H, x, out,
                                           want_logits ? lg : NULL, want_logits ? lc->E : 0);
        double t1 = moe_now();
        if (st != MOE_OK) {
            if (!lt->errors)
                snprintf(lt->first_error, sizeof lt->first_error, "request %d (T=%d): %s", r, T,
                         moe_client_last_error(c));
            lt->errors++;
            if (moe_client_connect(c, lc->addr) != MOE_OK) { /* reconnect after a broken stream */
                lt->errors += (uint64_t)(lc->requests - r - 1);
                break;
            }
            continue;
        }
        lt->lat[lt->nlat++] = t1 - sched;
        uint64_t bad = 0;
        for (int t = 0; t < T; t++) {
            bool good = rows_equal(lc->dt, out + (size_t)t * rh, lc->pout + (size_t)idx[t] * rh, lc->H, lc->tol);
            if (want_logits)
                good = good && rows_equal(lc->dt, lg + (size_t)t * re, lc->plog + (size_t)idx[t] * re, lc->E, lc->tol);
            if (!good) bad++;
        }
        if (bad && !lt->mismatched_rows)
            snprintf(lt->first_error, sizeof lt->first_error, "request %d (T=%d): %" PRIu64
                     " row(s) differ from the in-process engine", r, T, bad);
        lt->mismatched_rows += bad;
        lt->ok += bad == 0;
        lt->tokens += (uint64_t)T;
    }
done:
    moe_client_free(c);
    free(x); free(out); free(lg); free(idx);
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const double *v, size_t n, double p)
{
    if (!n) return 0;
    size_t i = (size_t)(p / 100.0 * (double)n + 0.999999);
    if (i < 1) i = 1;
    if (i > n) i = n;
    return v[i - 1];
}

/* Expected outputs of the pool, in process. */
static moe_status local_reference(const char *config, const char *weights, int layer_file,
                                  moe_dtype dt, int P, uint64_t seed, uint8_t **px,
                                  uint8_t **pout, uint8_t **plog, moe_config *cfg, moe_error *err)
{
    MOE_TRY(moe_config_resolve(config, cfg, err));
    size_t esz = moe_dtype_size(dt);
    int H = cfg->hidden, E = cfg->num_experts;
    *px = moe_malloc((size_t)P * H * esz, "pool", err);
    *pout = moe_malloc((size_t)P * H * esz, "pool out", err);
    *plog = moe_malloc((size_t)P * E * esz, "pool logits", err);
    if (!*px || !*pout || !*plog) return MOE_ERR_NOMEM;
    moe_fill_normal(dt, *px, (size_t)P * H, seed, "client.load.x", 0, 1.0);
    moe_layer *L = NULL;
    moe_status s = moe_serve_layer_create(config, weights, layer_file, dt, MOE_BACKEND_CPU, P, 0,
                                          NULL, &L, err);
    if (s == MOE_OK) {
        moe_tensor_view vx = {dt, 2, {P, H}, *px}, vo = {dt, 2, {P, H}, *pout},
                        vl = {dt, 2, {P, E}, *plog};
        s = moe_layer_forward(L, &vx, &vo, &vl);
        if (s != MOE_OK) moe_fail(err, s, "%s", moe_last_error());
    }
    moe_layer_destroy(L);
    return s;
}

typedef struct load_opts {
    const char *addr, *vconfig, *vweights;
    int layer, clients, requests, max_T, fixed_T, pool, vlayer;
    uint64_t seed;
    double tol, rate;
    bool quiet;
} load_opts;

typedef struct load_result {
    uint64_t ok, errors, mismatched, tokens, requests;
    double seconds, p50, p99, mean;
} load_result;

/* Run C clients x N requests against addr; expected rows from the local engine. */
static int run_load(const load_opts *lo, const moe_client_info *in, const uint8_t *px,
                    const uint8_t *pout, const uint8_t *plog, load_result *res)
{
    load_ctx lc = {.addr = lo->addr, .layer = lo->layer, .requests = lo->requests,
                   .max_T = MOE_MIN(MOE_MAX(lo->max_T, lo->fixed_T), in->max_tokens),
                   .fixed_T = MOE_MIN(lo->fixed_T, in->max_tokens), .seed = lo->seed,
                   .H = in->hidden, .E = in->num_experts, .pool = lo->pool, .dt = in->dtype,
                   .tol = lo->tol, .px = px, .pout = pout, .plog = plog,
                   .rate = lo->rate > 0 ? lo->rate / lo->clients : 0};
    load_thread *th = calloc((size_t)lo->clients, sizeof *th);
    if (!th) return 1;
    lc.t_start = moe_now() + 0.01;
    double t0 = moe_now();
    int started = 0;
    for (int i = 0; i < lo->clients; i++) {
        th[i].lc = &lc;
        th[i].id = i;
        th[i].lat = malloc((size_t)lo->requests * sizeof(double) + 1);
        if (!th[i].lat || pthread_create(&th[i].th, NULL, load_main, &th[i]) != 0) break;
        started++;
    }
    for (int i = 0; i < started; i++) pthread_join(th[i].th, NULL);
    double secs = moe_now() - t0;
    memset(res, 0, sizeof *res);
    size_t nl = 0;
    for (int i = 0; i < started; i++) nl += (size_t)th[i].nlat;
    double *lat = malloc((nl + 1) * sizeof *lat);
    nl = 0;
    for (int i = 0; i < lo->clients; i++) {
        res->ok += th[i].ok;
        res->errors += th[i].errors;
        res->mismatched += th[i].mismatched_rows;
        res->tokens += th[i].tokens;
        if (i >= started) res->errors += (uint64_t)lo->requests;
        if ((th[i].errors || th[i].mismatched_rows) && !lo->quiet)
            fprintf(stderr, "moe-ep client: client %d: %s\n", i, th[i].first_error);
        for (int j = 0; lat && j < th[i].nlat; j++) lat[nl++] = th[i].lat[j];
        free(th[i].lat);
    }
    free(th);
    res->requests = (uint64_t)lo->clients * (uint64_t)lo->requests;
    res->seconds = secs;
    if (lat && nl) {
        qsort(lat, nl, sizeof *lat, cmp_double);
        double sum = 0;
        for (size_t i = 0; i < nl; i++) sum += lat[i];
        res->mean = sum / (double)nl;
        res->p50 = pct(lat, nl, 50);
        res->p99 = pct(lat, nl, 99);
    }
    free(lat);
    return 0;
}

/* ---------------------------------------------------------------- malformed frames ---- */

static const char *const malformed_cases[] = {
    "bad-magic", "bad-version", "unknown-op", "wrong-h", "wrong-dtype", "unknown-layer",
    "t-zero", "t-over", "length-mismatch", "oversize", "bad-flags", "nonzero-status",
    "trunc-close", "trunc-payload-close", "trunc-stall", "disconnect", "no-read",
    "too-many-connections", NULL};

static void send_raw(int fd, const moe_proto_header *h, const void *payload, size_t plen)
{
    uint8_t hb[MOE_PROTO_HEADER_SIZE];
    moe_proto_encode_header(h, hb);
    moe_error e = {0};
    if (moe_net_write_all(fd, hb, sizeof hb, moe_now() + 10, &e) != MOE_OK ||
        (plen && moe_net_write_all(fd, payload, plen, moe_now() + 10, &e) != MOE_OK))
        printf("  send: %s\n", e.msg);
}

/* Read one reply frame and print it; returns its status, or -1 when the connection closed
 * or nothing came within timeout_s. */
static int read_reply(int fd, double timeout_s, const char *label)
{
    uint8_t hb[MOE_PROTO_HEADER_SIZE];
    moe_error e = {0};
    if (moe_net_read_all(fd, hb, sizeof hb, moe_now() + timeout_s, &e) != MOE_OK) {
        printf("%s: no reply (%s)\n", label, e.msg);
        return -1;
    }
    moe_proto_header h;
    moe_proto_decode_header(hb, &h);
    char msg[MOE_PROTO_MAX_MESSAGE + 1] = "";
    size_t n = h.payload_len;
    if (h.status != 0 && n <= MOE_PROTO_MAX_MESSAGE) {
        if (moe_net_read_all(fd, msg, n, moe_now() + timeout_s, &e) == MOE_OK) msg[n] = 0;
    } else if (n) { /* a success payload: drop it */
        uint8_t buf[4096];
        while (n) {
            size_t k = n < sizeof buf ? n : sizeof buf;
            if (moe_net_read_all(fd, buf, k, moe_now() + timeout_s, &e) != MOE_OK) break;
            n -= k;
        }
    }
    printf("%s: reply op=0x%04x id=%" PRIu64 " status=%u (%s)%s%s%s\n", label, (unsigned)h.op,
           h.request_id, (unsigned)h.status, moe_strerror((moe_status)h.status),
           h.status ? " message=\"" : "", msg, h.status ? "\"" : "");
    return (int)h.status;
}

/* After an error: does the connection still answer an INFO request? */
static void probe(int fd, const char *label)
{
    moe_proto_header h = moe_proto_header_init(MOE_OP_INFO, 4242);
    uint8_t hb[MOE_PROTO_HEADER_SIZE];
    moe_proto_encode_header(&h, hb);
    moe_error e = {0};
    bool sent = moe_net_write_all(fd, hb, sizeof hb, moe_now() + 5, &e) == MOE_OK;
    char lab[96];
    snprintf(lab, sizeof lab, "%s probe", label);
    int st = sent ? read_reply(fd, 5, lab) : -1;
    printf("%s: connection %s\n", label, st == 0 ? "usable" : "closed");
}

static int malformed(const char *addr, const char *which, const moe_client_info *in, int count,
                     int hold_ms, int wait_ms, int rows)
{
    moe_proto_addr a;
    char m[256];
    if (moe_proto_parse_addr(addr, &a, m, sizeof m) != MOE_OK) {
        fprintf(stderr, "moe-ep client: %s\n", m);
        return 2;
    }
    size_t esz = moe_dtype_size(in->dtype);
    int H = in->hidden, T = 2;
    moe_proto_header h = moe_proto_header_init(MOE_OP_FORWARD, 7);
    h.layer = in->layers[0];
    h.dtype = (uint16_t)in->dtype;
    h.T = (uint32_t)T;
    h.H = (uint32_t)H;
    size_t maxbytes = (size_t)in->max_tokens * H * 4 + (size_t)T * (H + 1) * 4;
    uint8_t *pl = calloc(1, maxbytes);
    if (!pl) return 1;
    h.payload_len = (uint64_t)T * H * esz;
    const char *label = which;
    moe_error e = {0};

    if (strcmp(which, "too-many-connections") == 0) {
        int *fds = malloc((size_t)count * sizeof *fds), refused = 0, accepted = 0;
        for (int i = 0; fds && i < count; i++)
            if (moe_net_connect(&a, 5000, &fds[i], &e) != MOE_OK) { fds[i] = -1; refused++; }
        /* A refused connection gets an error frame right after accept; an accepted one gets
         * nothing. Allow a second for a busy server to get to every connection. */
        double until = moe_now() + 1.0;
        for (int i = 0; fds && i < count; i++) {
            if (fds[i] < 0) continue;
            struct pollfd p = {.fd = fds[i], .events = POLLIN};
            int ms = (int)((until - moe_now()) * 1000);
            if (poll(&p, 1, ms > 0 ? ms : 0) > 0) {
                char lab[64];
                snprintf(lab, sizeof lab, "%s #%d", label, i);
                read_reply(fds[i], 2, lab);
                refused++;
                close(fds[i]);
                fds[i] = -1;
            } else {
                accepted++;
            }
        }
        printf("%s: %d accepted, %d refused\n", label, accepted, refused);
        if (hold_ms > 0) usleep((useconds_t)hold_ms * 1000);
        for (int i = 0; fds && i < count; i++) if (fds[i] >= 0) close(fds[i]);
        free(fds);
        free(pl);
        return 0;
    }

    int fd;
    if (moe_net_connect(&a, 5000, &fd, &e) != MOE_OK) {
        fprintf(stderr, "moe-ep client: %s\n", e.msg);
        free(pl);
        return 1;
    }
    int rc = 0;
    double rt = 10 + wait_ms / 1000.0;
    if (strcmp(which, "bad-magic") == 0) {
        h.magic = 0x4b4f4f42; /* "BOOK" */
        send_raw(fd, &h, NULL, 0); /* the server closes after the header: no payload */
    } else if (strcmp(which, "bad-version") == 0) {
        h.version = 99;
        send_raw(fd, &h, NULL, 0);
    } else if (strcmp(which, "unknown-op") == 0) {
        h.op = 77;
        send_raw(fd, &h, pl, (size_t)h.payload_len);
    } else if (strcmp(which, "wrong-h") == 0) {
        h.H = (uint32_t)H + 1;
        h.payload_len = (uint64_t)T * (H + 1) * esz;
        send_raw(fd, &h, pl, (size_t)h.payload_len);
    } else if (strcmp(which, "wrong-dtype") == 0) {
        moe_dtype other = in->dtype == MOE_DTYPE_F32 ? MOE_DTYPE_BF16 : MOE_DTYPE_F32;
        h.dtype = (uint16_t)other;
        h.payload_len = (uint64_t)T * H * moe_dtype_size(other);
        send_raw(fd, &h, pl, (size_t)h.payload_len);
    } else if (strcmp(which, "unknown-layer") == 0) {
        h.layer = 987654;
        send_raw(fd, &h, pl, (size_t)h.payload_len);
    } else if (strcmp(which, "t-zero") == 0) {
        h.T = 0;
        h.payload_len = 0;
        send_raw(fd, &h, NULL, 0);
    } else if (strcmp(which, "t-over") == 0) {
        h.T = (uint32_t)in->max_tokens + 1;
        h.payload_len = (uint64_t)h.T * H * esz;
        send_raw(fd, &h, NULL, 0); /* the server must not wait for this payload */
    } else if (strcmp(which, "length-mismatch") == 0) {
        h.payload_len = (uint64_t)T * H * esz - 4;
        send_raw(fd, &h, pl, (size_t)h.payload_len);
    } else if (strcmp(which, "oversize") == 0) {
        h.T = 1;
        h.payload_len = (uint64_t)in->max_tokens * H * esz + 1;
        send_raw(fd, &h, NULL, 0);
    } else if (strcmp(which, "bad-flags") == 0) {
        h.flags = 0x0080;
        send_raw(fd, &h, pl, (size_t)h.payload_len);
    } else if (strcmp(which, "nonzero-status") == 0) {
        h.status = 3;
        send_raw(fd, &h, pl, (size_t)h.payload_len);
    } else if (strcmp(which, "trunc-close") == 0 || strcmp(which, "trunc-payload-close") == 0) {
        uint8_t hb[MOE_PROTO_HEADER_SIZE];
        moe_proto_encode_header(&h, hb);
        bool hdr_only = strcmp(which, "trunc-close") == 0;
        moe_net_write_all(fd, hb, hdr_only ? 20 : sizeof hb, moe_now() + 5, &e);
        if (!hdr_only) moe_net_write_all(fd, pl, (size_t)h.payload_len / 2, moe_now() + 5, &e);
        shutdown(fd, SHUT_WR); /* the frame ends early; our receiving side stays open */
        rc = read_reply(fd, rt, label) < 0;
        printf("%s: connection %s\n", label, "closed");
        goto out;
    } else if (strcmp(which, "trunc-stall") == 0) {
        uint8_t hb[MOE_PROTO_HEADER_SIZE];
        moe_proto_encode_header(&h, hb);
        moe_net_write_all(fd, hb, sizeof hb, moe_now() + 5, &e);
        moe_net_write_all(fd, pl, (size_t)h.payload_len / 2, moe_now() + 5, &e);
        rc = read_reply(fd, rt, label) < 0; /* the server's io timeout answers */
        probe(fd, label);
        goto out;
    } else if (strcmp(which, "disconnect") == 0) {
        h.T = (uint32_t)(rows > 0 ? MOE_MIN(rows, in->max_tokens) : in->max_tokens);
        h.payload_len = (uint64_t)h.T * H * esz;
        send_raw(fd, &h, pl, (size_t)h.payload_len);
        printf("%s: sent a %u-row request and closed without reading\n", label, (unsigned)h.T);
        goto out;
    } else if (strcmp(which, "no-read") == 0) {
        h.T = (uint32_t)(rows > 0 ? MOE_MIN(rows, in->max_tokens) : in->max_tokens);
        h.payload_len = (uint64_t)h.T * H * esz;
        int sent = 0;
        for (int i = 0; i < count; i++) {
            uint8_t hb[MOE_PROTO_HEADER_SIZE];
            h.request_id = 100 + (uint64_t)i;
            moe_proto_encode_header(&h, hb);
            if (moe_net_write_all(fd, hb, sizeof hb, moe_now() + 5, &e) != MOE_OK ||
                moe_net_write_all(fd, pl, (size_t)h.payload_len, moe_now() + 5, &e) != MOE_OK)
                break;
            sent++;
        }
        printf("%s: sent %d %u-row request(s); reading none for up to %d ms\n", label, sent,
               (unsigned)h.T, hold_ms);
        fflush(stdout);
        /* Hold without reading until the server gives up on us (it closes: the peer-closed
         * flag shows without reading a byte) or hold_ms passes. */
        double t0 = moe_now(), end = t0 + hold_ms / 1000.0;
        bool closed = false;
        while (!closed && moe_now() < end) {
            struct pollfd p = {.fd = fd, .events = POLLRDHUP};
            int ms = (int)((end - moe_now()) * 1000) + 1;
            if (poll(&p, 1, ms) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR))) closed = true;
        }
        if (closed) printf("%s: closed by the server after %.0f ms\n", label, (moe_now() - t0) * 1e3);
        else printf("%s: still open after %d ms\n", label, hold_ms);
        goto out;
    } else {
        fprintf(stderr, "moe-ep client: unknown --malformed case '%s'; one of:", which);
        for (int i = 0; malformed_cases[i]; i++) fprintf(stderr, " %s", malformed_cases[i]);
        fprintf(stderr, "\n");
        rc = 2;
        goto out;
    }
    rc = read_reply(fd, rt, label) <= 0; /* an error reply is the expected outcome */
    probe(fd, label);
out:
    close(fd);
    free(pl);
    return rc;
}

/* ---------------------------------------------------------------- moe-ep client ---- */

int cli_client(int argc, char **argv)
{
    const char *cmd = "client";
    const char *addr = NULL, *input = NULL, *output = NULL, *bad = NULL, *vconfig = NULL, *vweights = NULL;
    const char *tol_s = NULL;
    int rate = 0;
    int layer = -1, timeout_ms = 60000, clients = 8, requests = 50, max_T = 64, pool = 512;
    int count = 4, hold_ms = 0, wait_ms = 0, vlayer = -1, rows = 0;
    uint64_t seed = 0;
    bool info = false, stats = false, shut = false, logits = false, load = false;
    cli_opt opts[] = {
        {"connect", OPT_STRING, "unix:PATH|tcp:HOST:PORT", "the server (required)", .str = &addr},
        {"input", OPT_STRING, "X.safetensors", "hidden_states [T,H] or [B,S,H] to run through the served layer", .str = &input},
        {"output", OPT_STRING, "Y.safetensors", "where to write `output` (and `router_logits` with --logits)", .str = &output},
        {"layer", OPT_INT, "L", "served layer to run (default: the first one the server lists)", .i = &layer, .min = 0},
        {"logits", OPT_FLAG, NULL, "also request and write router_logits", .flag = &logits},
        {"info", OPT_FLAG, NULL, "print the server's model, layers, dtype and ranks", .flag = &info},
        {"stats", OPT_FLAG, NULL, "print the server's counters and latency percentiles", .flag = &stats},
        {"shutdown", OPT_FLAG, NULL, "ask the server to drain and exit (needs --allow-remote-shutdown there)", .flag = &shut},
        {"timeout-ms", OPT_INT, "MS", "bound on each request (default 60000)", .i = &timeout_ms, .min = 1},
        {"load", OPT_FLAG, NULL, "load test: --clients connections x --requests requests of random T, each reply verified", .flag = &load},
        {"clients", OPT_INT, "C", "load: concurrent connections (default 8)", .i = &clients, .min = 1},
        {"requests", OPT_INT, "N", "load: requests per connection (default 50)", .i = &requests, .min = 1},
        {"max-T", OPT_INT, "T", "load: T uniform in 1..T (default 64, at most the server's limit)", .i = &max_T, .min = 1},
        {"pool", OPT_INT, "P", "load: distinct random rows requests draw from (default 512)", .i = &pool, .min = 1},
        {"seed", OPT_U64, "S", "load: random seed (default: from the clock, printed)", .u64 = &seed},
        {"verify-config", OPT_STRING, "C", "load: config for the in-process expected results (required with --load)", .str = &vconfig},
        {"verify-weights", OPT_STRING, "W", "load: weights for the expected results (required with --load)", .str = &vweights},
        {"verify-layer", OPT_INT, "N", "load: decoder layer of a full checkpoint (default: the block's own names)", .i = &vlayer, .min = 0},
        {"tol", OPT_STRING, "X", "load: relative error allowed per row (default: 0, bit for bit, with replicated experts; the dtype's per-row bound, fp32 1e-4, when the server is expert-parallel)", .str = &tol_s},
        {"rate", OPT_INT, "R", "load: pace the clients to R requests/s in all (default 0: back to back)", .i = &rate, .min = 0},
        {"malformed", OPT_STRING, "CASE", "testing: send one malformed frame and print the server's reply (bad-magic, wrong-h, trunc-stall, no-read, ...)", .str = &bad},
        {"count", OPT_INT, "N", "malformed: requests (no-read) or connections (too-many-connections) (default 4)", .i = &count, .min = 1},
        {"hold-ms", OPT_INT, "MS", "malformed: keep the connection(s) open this long before closing (default 0)", .i = &hold_ms, .min = 0},
        {"wait-ms", OPT_INT, "MS", "malformed: extra time to wait for the reply (default 0)", .i = &wait_ms, .min = 0},
        {"rows", OPT_INT, "T", "malformed: rows per request of no-read / disconnect (default: the server's limit)", .i = &rows, .min = 1},
        {0},
    };
    const char *syn = "--connect ADDR (--input X --output Y [--layer L] [--logits] | --info | --stats | --shutdown | --load ... | --malformed CASE)";
    const char *desc =
        "Talks to `moe-ep serve`. With --input/--output it runs hidden_states through a served\n"
        "layer (split into requests of the server's size limit) and writes `output`, which on\n"
        "the CPU backend equals `moe-ep forward`'s bit for bit. --load runs a verifying load test;\n"
        "exit status 1 if any request fails or any row differs from the in-process engine.";
    int prc = cli_parse(cmd, syn, desc, opts, argc, argv);
    if (prc) return prc == 1 ? 0 : 2;
    if ((prc = cli_require(cmd, opts, "connect"))) return prc;
    int modes = (input || output) + info + stats + shut + load + (bad != NULL);
    if (modes != 1) {
        fprintf(stderr, "moe-ep client: choose exactly one of --input/--output, --info, --stats, "
                        "--shutdown, --load, --malformed\n");
        return 2;
    }
    if ((input || output) && (!input || !output)) {
        fprintf(stderr, "moe-ep client: --input and --output go together\n");
        return 2;
    }
    if (load && (!vconfig || !vweights)) {
        fprintf(stderr, "moe-ep client: --load needs --verify-config and --verify-weights (the "
                        "expected results are computed in process)\n");
        return 2;
    }
    double tol = 0;
    if (tol_s) {
        char *end;
        tol = strtod(tol_s, &end);
        if (*end || tol < 0) {
            fprintf(stderr, "moe-ep client: --tol expects a non-negative number, got '%s'\n", tol_s);
            return 2;
        }
    }

    moe_client *c = moe_client_new();
    if (!c) return 1;
    moe_client_set_timeout(c, timeout_ms);
    if (moe_client_connect(c, addr) != MOE_OK) {
        fprintf(stderr, "moe-ep client: %s\n", moe_client_last_error(c));
        moe_client_free(c);
        return 1;
    }
    int rc = 0;
    moe_client_info in;
    if (stats) {
        moe_client_stats s;
        if (moe_client_stats_get(c, &s) != MOE_OK) rc = 1;
        else print_stats(&s);
    } else if (shut) {
        if (moe_client_shutdown(c) != MOE_OK) rc = 1;
        else printf("moe-ep client: the server is draining and will exit\n");
    } else if (moe_client_info_get(c, &in) != MOE_OK) {
        rc = 1;
    } else if (info) {
        print_info(&in);
    } else {
        if (layer < 0) layer = in.nlayers > 0 ? in.layers[0] : 0;
        if (input) {
            rc = forward_file(c, &in, input, output, layer, logits);
        } else if (bad) {
            moe_client_disconnect(c);
            rc = malformed(addr, bad, &in, count, hold_ms, wait_ms, rows);
        } else {
            if (!opt_seen(opts, "seed")) seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 20);
            printf("moe-ep client: load seed %" PRIu64 "\n", seed);
            moe_error err = {0};
            moe_config cfg;
            uint8_t *px = NULL, *pout = NULL, *plog = NULL;
            if (local_reference(vconfig, vweights, vlayer, in.dtype, pool, seed, &px, &pout, &plog, &cfg, &err) != MOE_OK) {
                fprintf(stderr, "moe-ep client: expected results: %s\n", err.msg);
                rc = 1;
            } else if (cfg.hidden != in.hidden || cfg.num_experts != in.num_experts) {
                fprintf(stderr, "moe-ep client: --verify-config has H=%d E=%d but the server H=%d E=%d\n",
                        cfg.hidden, cfg.num_experts, in.hidden, in.num_experts);
                rc = 1;
            } else {
                if (!tol_s) tol = auto_tol(&in);
                printf("moe-ep client: rows checked %s\n", tol > 0 ? "within the tolerance" : "bit for bit");
                load_opts lo = {.addr = addr, .layer = layer, .clients = clients, .requests = requests,
                                .max_T = max_T, .pool = pool, .seed = seed, .tol = tol,
                                .rate = rate};
                load_result r;
                run_load(&lo, &in, px, pout, plog, &r);
                printf("moe-ep client: load: %d clients x %d requests: %" PRIu64 " verified, %" PRIu64
                       " failed, %" PRIu64 " mismatched rows, %" PRIu64 " tokens in %.3f s "
                       "(%.1f req/s; latency p50 %.3f ms, p99 %.3f ms)\n",
                       clients, requests, r.ok, r.errors, r.mismatched, r.tokens, r.seconds,
                       (double)r.requests / r.seconds, r.p50 * 1e3, r.p99 * 1e3);
                rc = (r.errors || r.mismatched || r.ok != r.requests) ? 1 : 0;
            }
            free(px); free(pout); free(plog);
        }
    }
    if (rc == 1 && !input && !bad && !load && moe_client_last_error(c)[0])
        fprintf(stderr, "moe-ep client: %s\n", moe_client_last_error(c));
    moe_client_free(c);
    return rc;
}

/* ---------------------------------------------------------------- moe-ep gen-input ---- */

int cli_gen_input(int argc, char **argv)
{
    const char *cmd = "gen-input", *config = NULL, *output = NULL, *dtype_s = NULL;
    int tokens = 0;
    uint64_t seed = 1;
    cli_opt opts[] = {
        {"config", OPT_STRING, "PRESET|config.json", "model (its hidden size H and dtype) (required)", .str = &config},
        {"tokens", OPT_INT, "T", "rows (required)", .i = &tokens, .min = 1},
        {"seed", OPT_U64, "S", "random seed (default 1)", .u64 = &seed},
        {"dtype", OPT_STRING, "bf16|fp16|fp32", "dtype (default: the config's)", .str = &dtype_s},
        {"output", OPT_STRING, "X.safetensors", "file to write hidden_states [T,H] into (required)", .str = &output},
        {0},
    };
    int prc = cli_parse(cmd, "--config C --tokens T --output X [--seed S] [--dtype D]",
                        "Writes hidden_states [T,H] of standard normal values from the counter-based\n"
                        "generator (stream \"hidden_states\"), for tests and benchmarks.",
                        opts, argc, argv);
    if (prc) return prc == 1 ? 0 : 2;
    const char *req[] = {"config", "tokens", "output"};
    for (int i = 0; i < 3; i++)
        if ((prc = cli_require(cmd, opts, req[i]))) return prc;
    moe_error err = {0};
    moe_config cfg;
    if (moe_config_resolve(config, &cfg, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep gen-input: %s\n", err.msg);
        return 2;
    }
    moe_dtype dt = cfg.dtype;
    if (dtype_s && (!moe_dtype_parse(dtype_s, &dt) || dt == MOE_DTYPE_F64)) {
        fprintf(stderr, "moe-ep gen-input: --dtype expects bf16, fp16 or fp32, got '%s'\n", dtype_s);
        return 2;
    }
    moe_tensor t;
    if (moe_tensor_alloc2(&t, dt, tokens, cfg.hidden, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep gen-input: %s\n", err.msg);
        return 1;
    }
    moe_fill_normal(dt, t.data, moe_tensor_numel(&t), seed, "hidden_states", 0, 1.0);
    moe_st_writer wr;
    moe_st_writer_init(&wr);
    moe_status st = moe_st_writer_add(&wr, "hidden_states", &t, &err);
    if (st == MOE_OK) st = moe_st_write(&wr, output, &err);
    moe_st_writer_free(&wr);
    moe_tensor_free(&t);
    if (st != MOE_OK) {
        fprintf(stderr, "moe-ep gen-input: %s\n", err.msg);
        return 1;
    }
    printf("moe-ep gen-input: hidden_states [%d, %d] %s -> %s\n", tokens, cfg.hidden,
           moe_dtype_name(dt), output);
    return 0;
}

/* ---------------------------------------------------------------- moe-ep bench-serve ---- */

/* Parse "1,2,4,8" (positive integers). */
static int parse_list(const char *s, int *v, int cap)
{
    int n = 0;
    while (s && *s && n < cap) {
        char *end;
        long x = strtol(s, &end, 10);
        if (end == s || x < 1 || x > 1000000) return -1;
        v[n++] = (int)x;
        if (*end == ',') end++;
        else if (*end) return -1;
        s = end;
    }
    return n;
}

/* The engine called directly, in this process, on the same T rows: the baseline the
 * service's overhead is measured against. Returns seconds per call (median of reps). */
static double direct_engine(const char *config, const char *weights, int layer_file, moe_dtype dt,
                            const uint8_t *px, int T, int reps, double *p99, moe_error *err)
{
    moe_config cfg;
    if (moe_config_resolve(config, &cfg, err) != MOE_OK) return -1;
    moe_layer *L = NULL;
    double *t = malloc((size_t)reps * sizeof *t);
    double med = -1;
    if (t && moe_serve_layer_create(config, weights, layer_file, dt, MOE_BACKEND_CPU, T, 0, NULL,
                                    &L, err) == MOE_OK) {
        size_t esz = moe_dtype_size(dt);
        uint8_t *out = malloc((size_t)T * cfg.hidden * esz + 1), *lg = malloc((size_t)T * cfg.num_experts * esz + 1);
        int i;
        for (i = 0; out && lg && i < reps; i++) {
            double t0 = moe_now();
            /* The same call a served request makes on one rank. */
            moe_tensor_view vx = {dt, 2, {T, cfg.hidden}, (void *)px},
                            vo = {dt, 2, {T, cfg.hidden}, out}, vl = {dt, 2, {T, cfg.num_experts}, lg};
            moe_status s = moe_layer_forward(L, &vx, &vo, &vl);
            if (s != MOE_OK) {
                moe_fail(err, s, "%s", moe_last_error());
                break;
            }
            t[i] = moe_now() - t0;
        }
        if (i == reps) {
            qsort(t, (size_t)reps, sizeof *t, cmp_double);
            med = pct(t, (size_t)reps, 50);
            *p99 = pct(t, (size_t)reps, 99);
        }
        free(out);
        free(lg);
    }
    moe_layer_destroy(L);
    free(t);
    return med;
}

int cli_bench_serve(int argc, char **argv)
{
    const char *cmd = "bench-serve", *addr = NULL, *config = NULL, *weights = NULL;
    const char *clients_s = "1,2,4,8", *rates_s = NULL;
    int T = 16, requests = 200, layer = -1, layer_file = -1, rate_clients = 8;
    uint64_t seed = 1;
    cli_opt opts[] = {
        {"connect", OPT_STRING, "ADDR", "the server (required)", .str = &addr},
        {"config", OPT_STRING, "C", "the served model's config, for the in-process baseline (required)", .str = &config},
        {"weights", OPT_STRING, "W", "its weights (required)", .str = &weights},
        {"layer", OPT_INT, "L", "served layer (default: the first)", .i = &layer, .min = 0},
        {"layer-file", OPT_INT, "N", "decoder layer in the weights file (default: the block's own names)", .i = &layer_file, .min = 0},
        {"tokens", OPT_INT, "T", "rows per request (default 16)", .i = &T, .min = 1},
        {"requests", OPT_INT, "N", "requests per client per load level (default 200)", .i = &requests, .min = 1},
        {"clients", OPT_STRING, "C1,C2,..", "closed-loop load levels: concurrent clients sending back to back (default 1,2,4,8)", .str = &clients_s},
        {"rates", OPT_STRING, "R1,R2,..", "open-loop load levels in requests/s (latency counted from the scheduled send time)", .str = &rates_s},
        {"rate-clients", OPT_INT, "C", "connections sharing an open-loop rate (default 8)", .i = &rate_clients, .min = 1},
        {"seed", OPT_U64, "S", "random rows (default 1)", .u64 = &seed},
        {0},
    };
    int prc = cli_parse(cmd, "--connect ADDR --config C --weights W [--tokens T] [--clients 1,2,4] [--rates 100,200]",
                        "Measures a running `moe-ep serve`: requests/s and p50/p99 latency at each load\n"
                        "level, every reply verified against the engine run in this process, and the\n"
                        "service's overhead: its single-client latency over the direct engine call's.",
                        opts, argc, argv);
    if (prc) return prc == 1 ? 0 : 2;
    const char *req[] = {"connect", "config", "weights"};
    for (int i = 0; i < 3; i++)
        if ((prc = cli_require(cmd, opts, req[i]))) return prc;
    int cl[32], rt[32];
    int ncl = parse_list(clients_s, cl, 32), nrt = rates_s ? parse_list(rates_s, rt, 32) : 0;
    if (ncl < 0 || nrt < 0) {
        fprintf(stderr, "moe-ep bench-serve: --clients / --rates expect positive integers separated by commas\n");
        return 2;
    }
    moe_client *c = moe_client_new();
    moe_client_info in;
    if (!c || moe_client_connect(c, addr) != MOE_OK || moe_client_info_get(c, &in) != MOE_OK) {
        fprintf(stderr, "moe-ep bench-serve: %s\n", c ? moe_client_last_error(c) : "out of memory");
        moe_client_free(c);
        return 1;
    }
    moe_client_free(c);
    if (layer < 0) layer = in.layers[0];
    if (T > in.max_tokens) T = in.max_tokens;
    int pool = MOE_MAX(512, T);
    moe_error err = {0};
    moe_config cfg;
    uint8_t *px = NULL, *pout = NULL, *plog = NULL;
    int rc = 0;
    if (local_reference(config, weights, layer_file, in.dtype, pool, seed, &px, &pout, &plog, &cfg, &err) != MOE_OK) {
        fprintf(stderr, "moe-ep bench-serve: %s\n", err.msg);
        rc = 1;
        goto out;
    }
    double d99 = 0;
    double direct = direct_engine(config, weights, layer_file, in.dtype, px, T, MOE_MAX(50, requests), &d99, &err);
    if (direct < 0) {
        fprintf(stderr, "moe-ep bench-serve: direct engine: %s\n", err.msg);
        rc = 1;
        goto out;
    }
    printf("# moe-ep bench-serve: %s, model %s H=%d E=%d k=%d %s, %d rank(s), backend %s, "
           "T=%d rows/request, %d requests per client, batching wait %d us\n",
           addr, in.model, in.hidden, in.num_experts, in.top_k, moe_dtype_name(in.dtype),
           in.nranks, in.backend, T, requests, in.max_wait_us);
    printf("# replies verified %s\n", auto_tol(&in) > 0 ? "within the per-row tolerance (expert-parallel)"
                                                        : "bit for bit");
    printf("# direct engine in process (%d OpenMP threads): p50 %.3f ms, p99 %.3f ms, %.1f req/s\n",
           omp_get_max_threads(), direct * 1e3, d99 * 1e3, 1.0 / direct);
    printf("%-14s %8s %10s %11s %10s %10s %10s %9s\n", "load", "clients", "req/s", "tokens/s",
           "p50_ms", "p99_ms", "p50/direct", "verified");
    double single_p50 = 0;
    for (int pass = 0; pass < 2; pass++) {
        int n = pass ? nrt : ncl;
        for (int i = 0; i < n; i++) {
            load_opts lo = {.addr = addr, .layer = layer, .clients = pass ? rate_clients : cl[i],
                            .requests = requests, .max_T = T, .fixed_T = T, .pool = pool,
                            .seed = seed + 17u * (uint64_t)i, .tol = auto_tol(&in),
                            .rate = pass ? rt[i] : 0};
            load_result r;
            if (run_load(&lo, &in, px, pout, plog, &r) != 0) { rc = 1; break; }
            char load[32];
            if (pass) snprintf(load, sizeof load, "open %d/s", rt[i]);
            else snprintf(load, sizeof load, "closed");
            if (!pass && cl[i] == 1) single_p50 = r.p50;
            printf("%-14s %8d %10.1f %11.0f %10.3f %10.3f %10.2f %4" PRIu64 "/%-4" PRIu64 "\n", load,
                   lo.clients, (double)r.ok / r.seconds, (double)r.tokens / r.seconds, r.p50 * 1e3,
                   r.p99 * 1e3, r.p50 / direct, r.ok, r.requests);
            fflush(stdout);
            if (r.errors || r.mismatched) rc = 1;
        }
    }
    if (single_p50 > 0)
        printf("# service overhead at 1 client: p50 %.3f ms vs direct %.3f ms = %.2fx (+%.3f ms)\n",
               single_p50 * 1e3, direct * 1e3, single_p50 / direct, (single_p50 - direct) * 1e3);
out:
    free(px); free(pout); free(plog);
    return rc;
}
