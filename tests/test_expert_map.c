/*
 * test_expert_map.c — the placement of experts over (virtual) ranks (src/layer/expert_map.h):
 * moe_expert_map_build's default slices (the first E mod N ranks one more) and its virtual
 * level (each rank's experts cut into V parts, the first El mod V one longer), against literal
 * tables and against ept_placement (tests/util/ep_test.c, written from the definition); the
 * refusals; and the placement-file parser (moe_expert_map_parse / moe_expert_map_load_file):
 * replication refused, every expert exactly once, one list per rank, ids in range, an empty
 * list allowed. No MPI.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test_util.h"

#include "common.h"
#include "ep_test.h"
#include "layer/expert_map.h"

/* A call that must fail with status want and a message containing needle. */
static void expect_fail(moe_status got, const moe_error *err, moe_status want, const char *needle)
{
    fprintf(stderr, "expected failure: %s\n", err->msg);
    assert_int_equal(want, got);
    assert_non_null(strstr(err->msg, needle));
}

/* ------------------------------------------------------------------ build ---- */

/* Every table of the map for rank `rank` against the definition (ept_placement). */
static void check_map(int E, int N, int V, int rank, const int32_t *owner_in)
{
    moe_error err;
    moe_error_clear(&err);
    moe_expert_map m;
    assert_int_equal(MOE_OK, moe_expert_map_build(E, N, V, rank, owner_in, &m, &err));
    int32_t owner[64], vowner[64], vlocal[64];
    ept_placement(E, N, V, owner_in, owner, vowner, vlocal);
    assert_int_equal(E, m.E);
    assert_int_equal(N, m.N);
    assert_int_equal(V, m.V);
    assert_int_equal(N * V, m.G);
    assert_int_equal(owner_in != NULL, m.explicit_map);
    int32_t vcount[256] = {0}, rank_count[64] = {0};
    for (int e = 0; e < E; e++) {
        assert_int_equal(owner[e], m.owner[e]);
        assert_int_equal(vowner[e], m.vowner[e]);
        assert_int_equal(vlocal[e], m.vlocal[e]);
        vcount[vowner[e]]++;
        rank_count[owner[e]]++;
    }
    for (int d = 0; d < N * V; d++) assert_int_equal(vcount[d], m.vcount[d]);
    for (int r = 0; r < N; r++) assert_int_equal(rank_count[r], m.rank_count[r]);
    /* this rank's experts, ascending, and where each of its virtual ranks starts */
    assert_int_equal(rank_count[rank], m.El);
    int l = 0;
    for (int e = 0; e < E; e++)
        if (owner[e] == rank) {
            assert_int_equal(e, m.local_ids[l]);
            /* local index l is part vowner-rank*V at position vlocal */
            assert_int_equal(l, m.vfirst[vowner[e] - rank * V] + vlocal[e]);
            l++;
        }
    int first = 0;
    for (int v = 0; v < V; v++) {
        assert_int_equal(first, m.vfirst[v]);
        first += vcount[rank * V + v];
    }
    moe_expert_map_free(&m);
}

/* Literal tables of a few uneven cases. */
static void test_build_literal(void **state)
{
    (void)state;
    moe_error err;
    moe_error_clear(&err);
    moe_expert_map m;
    /* E = 7 over 4 ranks: 2, 2, 2, 1 */
    assert_int_equal(MOE_OK, moe_expert_map_build(7, 4, 1, 3, NULL, &m, &err));
    int32_t o74[7] = {0, 0, 1, 1, 2, 2, 3};
    assert_memory_equal(o74, m.owner, sizeof o74);
    assert_int_equal(1, m.El);
    assert_int_equal(6, m.local_ids[0]);
    moe_expert_map_free(&m);
    /* E = 12 over 5 ranks: 3, 3, 2, 2, 2 */
    assert_int_equal(MOE_OK, moe_expert_map_build(12, 5, 1, 1, NULL, &m, &err));
    int32_t o125[12] = {0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4};
    assert_memory_equal(o125, m.owner, sizeof o125);
    int32_t l1[3] = {3, 4, 5};
    assert_int_equal(3, m.El);
    assert_memory_equal(l1, m.local_ids, sizeof l1);
    moe_expert_map_free(&m);
    /* E = 7 over 2 ranks x 2 virtual: rank 0 holds 4 (parts 2, 2), rank 1 holds 3 (2, 1) */
    assert_int_equal(MOE_OK, moe_expert_map_build(7, 2, 2, 1, NULL, &m, &err));
    int32_t vo[7] = {0, 0, 1, 1, 2, 2, 3}, vl[7] = {0, 1, 0, 1, 0, 1, 0}, vc[4] = {2, 2, 2, 1};
    assert_memory_equal(vo, m.vowner, sizeof vo);
    assert_memory_equal(vl, m.vlocal, sizeof vl);
    assert_memory_equal(vc, m.vcount, sizeof vc);
    assert_int_equal(0, m.vfirst[0]);
    assert_int_equal(2, m.vfirst[1]);
    moe_expert_map_free(&m);
    /* E = 3 on one rank x 4 virtual: parts 1, 1, 1, 0 (a virtual rank may own none) */
    assert_int_equal(MOE_OK, moe_expert_map_build(3, 1, 4, 0, NULL, &m, &err));
    int32_t vc3[4] = {1, 1, 1, 0}, vf3[4] = {0, 1, 2, 3};
    assert_memory_equal(vc3, m.vcount, sizeof vc3);
    assert_memory_equal(vf3, m.vfirst, sizeof vf3);
    moe_expert_map_free(&m);
    /* an explicit, interleaved owner table over 2 x 2: rank 0 holds {0, 2, 4} (parts {0, 2},
     * {4}), rank 1 holds {1, 3} (parts {1}, {3}); the ids sent are indices within a part */
    const int32_t own[5] = {0, 1, 0, 1, 0};
    assert_int_equal(MOE_OK, moe_expert_map_build(5, 2, 2, 0, own, &m, &err));
    int32_t vo5[5] = {0, 2, 0, 3, 1}, vl5[5] = {0, 0, 1, 0, 0}, li5[3] = {0, 2, 4};
    assert_memory_equal(vo5, m.vowner, sizeof vo5);
    assert_memory_equal(vl5, m.vlocal, sizeof vl5);
    assert_memory_equal(li5, m.local_ids, sizeof li5);
    assert_false(moe_expert_map_contiguous(&m, NULL));
    moe_expert_map_free(&m);
}

/* Every rank's view of many (E, N, V), default slices and explicit tables. */
static void test_build_sweep(void **state)
{
    (void)state;
    const int Es[] = {1, 3, 5, 7, 8, 12, 13};
    for (size_t i = 0; i < sizeof Es / sizeof Es[0]; i++)
        for (int N = 1; N <= 5; N++)
            for (int V = 1; V <= 4; V++)
                for (int r = 0; r < N; r++) {
                    const int E = Es[i];
                    if (N <= E) check_map(E, N, V, r, NULL);
                    /* explicit: interleaved, and one putting everything on the last rank */
                    int32_t a[16], b[16];
                    for (int e = 0; e < E; e++) {
                        a[e] = (e * 2 + 1) % N;
                        b[e] = N - 1;
                    }
                    check_map(E, N, V, r, a);
                    check_map(E, N, V, r, b);
                }
}

static void test_build_refusals(void **state)
{
    (void)state;
    moe_error err;
    moe_expert_map m;
    int32_t bad[3] = {0, 2, 0};
    moe_error_clear(&err);
    expect_fail(moe_expert_map_build(3, 4, 1, 0, NULL, &m, &err), &err, MOE_ERR_INVALID_ARG,
                "4 ranks but only 3 experts");
    assert_null(m.owner);
    /* the same with an explicit map leaving ranks empty is fine */
    int32_t ok3[3] = {3, 0, 3};
    moe_error_clear(&err);
    assert_int_equal(MOE_OK, moe_expert_map_build(3, 4, 1, 1, ok3, &m, &err));
    assert_int_equal(0, m.El);
    assert_null(m.local_ids);
    assert_true(moe_expert_map_contiguous(&m, NULL));
    moe_expert_map_free(&m);
    moe_error_clear(&err);
    expect_fail(moe_expert_map_build(3, 2, 1, 0, bad, &m, &err), &err, MOE_ERR_INVALID_ARG,
                "expert 1 is owned by rank 2, outside [0, 2)");
    bad[1] = -1;
    moe_error_clear(&err);
    expect_fail(moe_expert_map_build(3, 2, 1, 0, bad, &m, &err), &err, MOE_ERR_INVALID_ARG,
                "rank -1");
    moe_error_clear(&err);
    expect_fail(moe_expert_map_build(3, 2, 0, 0, NULL, &m, &err), &err, MOE_ERR_INVALID_ARG,
                "--ep-virtual 0");
    moe_error_clear(&err);
    expect_fail(moe_expert_map_build(0, 1, 1, 0, NULL, &m, &err), &err, MOE_ERR_INVALID_ARG,
                "E = 0");
    moe_error_clear(&err);
    expect_fail(moe_expert_map_build(4, 2, 1, 2, NULL, &m, &err), &err, MOE_ERR_INVALID_ARG,
                "rank 2 of 2");
}

/* The hash is what the ranks agree on: equal maps, equal hashes; any difference shows. */
static void test_hash(void **state)
{
    (void)state;
    moe_error err;
    moe_error_clear(&err);
    moe_expert_map a, b, c, d;
    const int32_t own[5] = {0, 1, 0, 1, 0}, own2[5] = {0, 1, 0, 1, 1};
    assert_int_equal(MOE_OK, moe_expert_map_build(5, 2, 1, 0, own, &a, &err));
    assert_int_equal(MOE_OK, moe_expert_map_build(5, 2, 1, 1, own, &b, &err)); /* other rank */
    assert_int_equal(MOE_OK, moe_expert_map_build(5, 2, 1, 0, own2, &c, &err));
    assert_int_equal(MOE_OK, moe_expert_map_build(5, 2, 2, 0, own, &d, &err));
    assert_true(moe_expert_map_hash(&a) == moe_expert_map_hash(&b));
    assert_true(moe_expert_map_hash(&a) != moe_expert_map_hash(&c));
    assert_true(moe_expert_map_hash(&a) != moe_expert_map_hash(&d));
    int begin = -1;
    moe_expert_map_free(&c);
    assert_int_equal(MOE_OK, moe_expert_map_build(7, 2, 1, 1, NULL, &c, &err));
    assert_true(moe_expert_map_contiguous(&c, &begin));
    assert_int_equal(4, begin);
    moe_expert_map_free(&a);
    moe_expert_map_free(&b);
    moe_expert_map_free(&c);
    moe_expert_map_free(&d);
}

/* ------------------------------------------------------------------ the file ---- */

static void test_parse(void **state)
{
    (void)state;
    moe_error err;
    moe_error_clear(&err);
    int32_t *owner = NULL;
    /* ids need not be contiguous or sorted; a list may be empty */
    assert_int_equal(MOE_OK, moe_expert_map_parse("{\"experts_per_rank\": [[4, 0, 2], [], "
                                                  "[1, 3, 6], [5]]}", "t", 7, 4, &owner, &err));
    int32_t want[7] = {0, 2, 0, 2, 0, 3, 2};
    assert_memory_equal(want, owner, sizeof want);
    free(owner);
    struct {
        const char *json;
        int E, N;
        moe_status st;
        const char *needle;
    } bad[] = {
        {"{\"experts_per_rank\": [[0, 1], [1, 2]]}", 3, 2, MOE_ERR_UNSUPPORTED,
         "expert 1 is listed for rank 0 and rank 1"},
        {"{\"experts_per_rank\": [[0, 1, 0], [2]]}", 3, 2, MOE_ERR_UNSUPPORTED, "replication"},
        {"{\"experts_per_rank\": [[0], [2]]}", 3, 2, MOE_ERR_INVALID_ARG,
         "expert 1 is not listed for any rank"},
        {"{\"experts_per_rank\": [[0, 1, 2]]}", 3, 2, MOE_ERR_INVALID_ARG,
         "has 1 lists but the job has 2 ranks"},
        {"{\"experts_per_rank\": [[0], [1], [2]]}", 3, 2, MOE_ERR_INVALID_ARG,
         "has 3 lists but the job has 2 ranks"},
        {"{\"experts_per_rank\": [[0, 3], [1, 2]]}", 3, 2, MOE_ERR_INVALID_ARG, "out of range"},
        {"{\"experts_per_rank\": [[0, -1], [1, 2]]}", 3, 2, MOE_ERR_INVALID_ARG, "out of range"},
        {"{\"experts_per_rank\": [[0, 1.5], [1, 2]]}", 3, 2, MOE_ERR_INVALID_ARG, "out of range"},
        {"{\"experts_per_rank\": [[0, \"1\"], [2]]}", 3, 2, MOE_ERR_INVALID_ARG, "a non-number"},
        {"{\"experts_per_rank\": [[0, 1], 2]}", 3, 2, MOE_ERR_FORMAT,
         "experts_per_rank[1] is not a list"},
        {"{\"experts\": [[0, 1], [2]]}", 3, 2, MOE_ERR_FORMAT, "expected {\"experts_per_rank\""},
        {"[[0, 1], [2]", 3, 2, MOE_ERR_FORMAT, "not valid JSON"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        moe_error_clear(&err);
        owner = (int32_t *)&err; /* must come back NULL */
        moe_status st = moe_expert_map_parse(bad[i].json, "map.json", bad[i].E, bad[i].N,
                                             &owner, &err);
        expect_fail(st, &err, bad[i].st, bad[i].needle);
        assert_non_null(strstr(err.msg, "map.json"));
        assert_null(owner);
    }
}

static void test_load_file(void **state)
{
    (void)state;
    moe_error err;
    moe_error_clear(&err);
    char path[] = "/tmp/moe_expert_map_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fprintf(f, "{\n  \"experts_per_rank\": [\n    [1, 3],\n    [0, 2, 4]\n  ]\n}\n");
    fclose(f);
    int32_t *owner = NULL;
    assert_int_equal(MOE_OK, moe_expert_map_load_file(path, 5, 2, &owner, &err));
    int32_t want[5] = {1, 0, 1, 0, 1};
    assert_memory_equal(want, owner, sizeof want);
    free(owner);
    /* the file's name in the messages */
    moe_error_clear(&err);
    expect_fail(moe_expert_map_load_file(path, 6, 2, &owner, &err), &err, MOE_ERR_INVALID_ARG,
                "expert 5 is not listed");
    assert_non_null(strstr(err.msg, path));
    unlink(path);
    moe_error_clear(&err);
    expect_fail(moe_expert_map_load_file(path, 5, 2, &owner, &err), &err, MOE_ERR_IO,
                "cannot open");
    assert_null(owner);
}

int main(void)
{
    moe_test_seed(); /* no random data here; printed for uniformity */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_build_literal), cmocka_unit_test(test_build_sweep),
        cmocka_unit_test(test_build_refusals), cmocka_unit_test(test_hash),
        cmocka_unit_test(test_parse),          cmocka_unit_test(test_load_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
