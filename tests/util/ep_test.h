/*
 * ep_test.h — what the expert-parallel tests (test_mpi_ep*.c) share: layers made through the
 * public API (moe_ep.h), one rank's forward and backward with every output poisoned first, the
 * comparisons against a single-rank layer, the counters a routing implies, and a placement of
 * experts computed here independently of the library's expert map.
 *
 * The scheme of every equivalence check: each rank generates the SAME global inputs (x, dout
 * and d_router_logits [Tg, ...] from moe_fill_normal with one seed) and builds the same weights
 * (MOE_WEIGHTS_RANDOM with one seed); the single-rank reference is a layer without a
 * communicator (or over MPI_COMM_SELF with the same forced routing) run on all Tg tokens; the
 * expert-parallel layer runs on this rank's rows [off, off+T). Its outputs are compared with the
 * reference's rows, its experts' gradients with the reference's slices of them.
 *
 * Every function is local unless it says "collective"; none asserts: they print what failed
 * (with the rank) and return false, and the test agrees on the verdict over all ranks.
 */
#ifndef MOE_EP_TEST_H
#define MOE_EP_TEST_H

#include <mpi.h>
#include <stdbool.h>
#include <stdint.h>

#include "moe_ep.h"

/* ---- layers through the public API ---- */

/* A config.json in a fresh temporary directory (one per call; *path receives the file's
 * path, removed by ept_config_remove). model_type "qwen3_moe" (norm_topk_prob as given) or
 * "llama4_text" (shared expert of width I). dtype: "float32", "bfloat16". */
bool ept_config_write(char *path, size_t len, bool llama, int H, int I, int E, int k, bool norm,
                     const char *dtype);
void ept_config_remove(const char *path);

/* moe_ep_comm_create over comm (collective). */
moe_status ept_comm_make(MPI_Comm comm, const moe_ep_options *o, moe_ep_comm **out);
/* A CPU layer of `config` with MOE_WEIGHTS_RANDOM(wseed), computing in dt (MOE_NUM_DTYPES: the
 * config's), over comm (NULL: the plain single-rank layer) with the owner table map (NULL:
 * default slices). Collective with a comm. */
moe_status ept_layer_make(const char *config, moe_dtype dt, uint64_t wseed, moe_ep_comm *comm,
                         const int32_t *map, moe_layer **out);

/* The shapes of a layer, from moe_layer_info_get. */
typedef struct ept_shape {
    int H, I, E, k, Is, El, rank, nranks, V;
    bool llama;
    moe_dtype dt;
    size_t dsz;
    int32_t local[1024]; /* its experts' global ids, ascending */
    char transport[16];  /* "none" (plain path) or "mpi" */
} ept_shape;
bool ept_shape_of(const moe_layer *L, ept_shape *s);

/* ---- one rank's call ---- */

/* Outputs of one rank's forward and backward (allocated by ept_io_alloc, NaN-poisoned before
 * every call). */
typedef struct ept_io {
    int64_t T;
    void *out, *logits, *dx;                            /* [T,H], [T,E], [T,H] */
    void *g_router, *g_w13, *g_w2, *g_sg, *g_su, *g_sd; /* [E,H], [El,2I,H], [El,H,I],
                                                           [Is,H] x2, [H,Is] */
} ept_io;
void ept_io_alloc(const ept_shape *s, int64_t T, ept_io *io);
void ept_io_free(ept_io *io);

/* Forward of x [T,H] into io->out and io->logits; with async the backend-pointer call
 * (moe_layer_forward_async, stream NULL), else the host-view one. Collective with a comm. */
moe_status ept_forward(moe_layer *L, const ept_shape *s, const void *x, bool async, ept_io *io);
/* Backward of sum(out*dout) (+ sum(logits*dlog) when dlog): io->dx and every gradient. */
moe_status ept_backward(moe_layer *L, const ept_shape *s, const void *x, const void *dout,
                       const void *dlog, bool async, ept_io *io);

/* ---- data ---- */

/* n values of the global tensor `name` (moe_fill_normal with seed), in dt: the same on every
 * rank. */
void *ept_global(moe_dtype dt, size_t n, uint64_t seed, const char *name);
/* Tokens per rank: even (the first Tg mod N ranks one more) or skewed (rank r gets a share
 * ~ r+1, the LAST rank none when N > 1). off [N+1]. */
void ept_split(int Tg, int N, bool skewed, int *cnt, int *off);

/* ---- comparisons ---- */

/* a against ref (rows x cols of dt): moe_test_close's rule with tol. *ndiff (optional) gets
 * the number of elements that are not bitwise equal. */
bool ept_close(const char *what, moe_dtype dt, const void *a, const void *ref, size_t rows,
              size_t cols, double tol, size_t *ndiff);
/* Bitwise equal; names the first differing element otherwise. */
bool ept_bitwise(const char *what, const void *a, const void *b, size_t bytes, size_t esz);
/* The same bytes on every rank of comm as on its rank 0 (collective). */
bool ept_same_on_all(MPI_Comm comm, const char *what, const void *p, size_t bytes);

/* Bitwise-ness of ept_compare's fp32 comparisons, summed over its calls (for the tests'
 * reports: the forward and dx are often, not always, bitwise; the sum over k and the replicated
 * gradients' sum over ranks are associated differently from the single rank's). */
typedef struct ept_bits {
    uint64_t out_diff, out_n, dx_diff, dx_n, rep_diff, rep_n;
} ept_bits;

/* got (this rank's T rows starting at global row off, its local experts s->local) against the
 * reference ref (all tokens, experts ref_s->local), in the dtype's tolerance: out, logits
 * (forward); dx, router and shared-expert gradients (tolerance, and bitwise the same on every
 * rank of comm: collective), the experts' gradients BITWISE (backward). */
bool ept_compare(MPI_Comm comm, const ept_shape *s, const ept_io *got, const ept_shape *ref_s,
                const ept_io *ref, int64_t off, bool backward, ept_bits *bits);

/* ---- routing and counters ---- */

/* The placement, computed here (not by the library): owner[e] (from map, or the default slices:
 * the first E mod N ranks one more), then each rank's experts in ascending id order cut into V
 * parts, the first (count mod V) one longer: vowner[e] = r*V + v, vlocal[e] = index in part. */
void ept_placement(int E, int N, int V, const int32_t *map, int32_t *owner, int32_t *vowner,
                  int32_t *vlocal);
/* The router's choice of a logits row [E] (dt): the k largest, ties to the lower id. */
void ept_topk_of_logits(moe_dtype dt, const void *logits_row, int E, int k, int32_t *ids);
/* Every rank's [T,k] ids gathered into [Tg,k] in rank order (collective over comm). */
void ept_gather_ids(MPI_Comm comm, const int *cnt, const int *off, int k, const int32_t *mine,
                   int32_t *all);

/* The counters of one sized call on this rank (rank `me` of N, V virtual ranks, tokens of rank
 * r are global rows [off[r], off[r+1])), from the global ids [Tg,k] and vowner: a token goes
 * once to every virtual rank that owns at least one of its experts. Checks the totals since
 * the last moe_layer_stats_reset hold exactly `calls` such calls of kind (1 forward, 2
 * backward), the per-peer rows and bytes, tokens_local, tokens_computed, and with nchunks > 1
 * the chunk timeline (monotonic per chunk, rows and tokens adding up). plain: the layer is the
 * plain path (nothing sent, T rows computed). */
bool ept_check_counters(const moe_layer *L, const ept_shape *s, int N, int V, int me,
                       const int *off, const int32_t *ids_g, const int32_t *vowner, int kind,
                       int calls, int nchunks, bool plain);

/* Every local expert's gradient slices are exactly zero when no token of ids_g [Tg,k] chose it,
 * and not all zero when some did (backward with io's gradients). */
bool ept_check_unrouted_zero(const ept_shape *s, const ept_io *io, const int32_t *ids_g, int Tg);

#endif /* MOE_EP_TEST_H */

/* ---- one whole equivalence case ---- */

typedef struct ept_case {
    const char *config;    /* preset or config.json path */
    moe_dtype dt;          /* MOE_NUM_DTYPES: the config's */
    uint64_t seed;         /* weights and data */
    int Tg;                /* global tokens (with self: this process's) */
    bool skewed;           /* ept_split's skewed split (the last rank gets none) */
    bool self;             /* each process alone: the comm over MPI_COMM_SELF */
    int V, C;              /* virtual ranks, chunks (0 = 1) */
    int64_t M;             /* max_tokens_per_rank: 0 none, -1 the largest T of the split */
    const int32_t *map;    /* explicit owner table [E], or NULL */
    bool async;            /* the backend-pointer calls (else the host views) */
    bool dlogits;          /* a d_router_logits input to the backward */
    const char *route;     /* forced routing of the EP layer (NULL: the router's) */
    const char *ref_route; /* with route: the reference's, a layer over MPI_COMM_SELF */
    const int32_t *ids_g;  /* with route: the ids it must produce [Tg,k] */
    /* optional: more checks of this rank's EP outputs after the backward (io->out still holds
     * the forward's), rows [off, off+T) of the global batch; x, dout the global inputs */
    bool (*check)(void *arg, const moe_layer *L, const ept_shape *s, const ept_io *io,
                  int64_t off, const void *x, const void *dout);
    void *check_arg;
} ept_case;

/* Runs the case on every rank (collective over MPI_COMM_WORLD): forward and backward of the
 * expert-parallel layer against the reference, the counters of both after each call, and the
 * gradients of experts that no token chose exactly zero. Prints the case and what failed. */
bool ept_case_run(const ept_case *c, ept_bits *bits);
/* The bitwise-ness summed over all ranks, printed by rank 0 (collective). */
void ept_bits_report(const char *what, const ept_bits *b);
