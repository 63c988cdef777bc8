/*
 * test_threads.c — the default thread count (src/threads.h) without MPI: the pure sharing rule
 * on synthetic masks (each expectation worked out by hand from "each CPU split evenly among the
 * processes bound to it, shares summed, floor, at least 1"), the OMP_NUM_THREADS parser, and
 * the process-level functions: OMP_NUM_THREADS set before the first call wins, the first
 * result is cached (also when many threads make the first call at once), and without MPI the
 * binding part is the CPU count of this process's affinity mask.
 */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <omp.h>

#include "test_util.h"

#include "moe_threads.h"

#define NB 128 /* bytes per synthetic mask: CPUs 0..1023 */
#define MAXP 8

typedef struct {
    uint8_t m[MAXP][NB];
} masks;

/* CPUs lo..hi (inclusive) into process p's mask */
static void on(masks *s, int p, int lo, int hi)
{
    for (int c = lo; c <= hi; c++) s->m[p][c / 8] |= (uint8_t)(1u << (c % 8));
}

static int share(const masks *s, int p, int nprocs)
{
    return moe_threads_share(s->m[p], &s->m[0][0], nprocs, NB);
}

static void test_split_2_2_2_2(void **state)
{
    (void)state;
    masks s = {0};
    for (int p = 0; p < 4; p++) on(&s, p, 2 * p, 2 * p + 1); /* 4 ranks, 8 CPUs, disjoint */
    for (int p = 0; p < 4; p++) assert_int_equal(share(&s, p, 4), 2);
}

static void test_all_on_same_cpus(void **state)
{
    (void)state;
    masks s = {0};
    for (int p = 0; p < 4; p++) on(&s, p, 0, 1); /* 4 ranks on the same 2 CPUs: 1/2 -> 1 */
    for (int p = 0; p < 4; p++) assert_int_equal(share(&s, p, 4), 1);
    memset(&s, 0, sizeof s);
    for (int p = 0; p < 4; p++) on(&s, p, 0, 7); /* the example: 8 CPUs, 4 ranks */
    for (int p = 0; p < 4; p++) assert_int_equal(share(&s, p, 4), 2);
    memset(&s, 0, sizeof s);
    for (int p = 0; p < 2; p++) on(&s, p, 0, 1); /* today's CI: 2 ranks, 2 CPUs */
    for (int p = 0; p < 2; p++) assert_int_equal(share(&s, p, 2), 1);
}

static void test_unbound(void **state)
{
    (void)state;
    masks s = {0};
    for (int p = 0; p < 3; p++) on(&s, p, 0, 15); /* unbound = every CPU: 16/3 -> 5 */
    for (int p = 0; p < 3; p++) assert_int_equal(share(&s, p, 3), 5);
    /* alone on the node: all its CPUs */
    assert_int_equal(moe_threads_share(s.m[0], s.m[0], 1, NB), 16);
    /* CPUs in the high bytes count too */
    memset(&s, 0, sizeof s);
    on(&s, 0, 1000, 1023);
    on(&s, 1, 1012, 1023);
    assert_int_equal(share(&s, 0, 2), 12 + 6);
    assert_int_equal(share(&s, 1, 2), 6);
}

static void test_overlapping(void **state)
{
    (void)state;
    masks s = {0};
    /* one rank on 0-7 beside 4 ranks on 2 CPUs each: every CPU has 2 processes */
    on(&s, 0, 0, 7);
    for (int p = 1; p <= 4; p++) on(&s, p, 2 * (p - 1), 2 * (p - 1) + 1);
    assert_int_equal(share(&s, 0, 5), 4);
    for (int p = 1; p <= 4; p++) assert_int_equal(share(&s, p, 5), 1);

    /* A, B on 0-7, C on 0: A = 1/3 + 7/2 = 3.83 -> 3, C = 1/3 -> 1 */
    memset(&s, 0, sizeof s);
    on(&s, 0, 0, 7);
    on(&s, 1, 0, 7);
    on(&s, 2, 0, 0);
    assert_int_equal(share(&s, 0, 3), 3);
    assert_int_equal(share(&s, 1, 3), 3);
    assert_int_equal(share(&s, 2, 3), 1);

    /* a chain 0-3, 2-5, 4-7: 2 + 2/2 = 3, 4/2 = 2, 3 */
    memset(&s, 0, sizeof s);
    on(&s, 0, 0, 3);
    on(&s, 1, 2, 5);
    on(&s, 2, 4, 7);
    assert_int_equal(share(&s, 0, 3), 3);
    assert_int_equal(share(&s, 1, 3), 2);
    assert_int_equal(share(&s, 2, 3), 3);

    /* the simple "CPUs / overlapping processes" rule would give 16/3 = 5 here; the shares
     * give 12 + 4/3 = 13.3 -> 13 to the rank on 0-15 and 4/3 -> 1 to the two on 12-15 */
    memset(&s, 0, sizeof s);
    on(&s, 0, 0, 15);
    on(&s, 1, 12, 15);
    on(&s, 2, 12, 15);
    assert_int_equal(share(&s, 0, 3), 13);
    assert_int_equal(share(&s, 1, 3), 1);
}

static void test_exact_fractions(void **state)
{
    (void)state;
    /* k * (1/n) summed in double must not fall just below an integer */
    for (int n = 1; n <= MAXP; n++)
        for (int mult = 1; mult <= 5; mult++) {
            masks s = {0};
            for (int p = 0; p < n; p++) on(&s, p, 0, n * mult - 1);
            for (int p = 0; p < n; p++) assert_int_equal(share(&s, p, n), mult);
        }
}

static void test_degenerate(void **state)
{
    (void)state;
    masks s = {0};
    on(&s, 1, 0, 7);
    assert_int_equal(share(&s, 0, 2), 1);                        /* empty mask: 1 */
    assert_int_equal(moe_threads_share(s.m[1], NULL, 0, NB), 8); /* self missing from all */
    assert_int_equal(moe_threads_share(s.m[1], s.m[0], 1, NB), 8);
    assert_int_equal(moe_threads_share(NULL, NULL, 0, NB), 1);
    assert_int_equal(moe_threads_share(s.m[1], &s.m[0][0], 2, 0), 1); /* zero-byte masks */
}

static void test_parse_env(void **state)
{
    (void)state;
    assert_int_equal(moe_threads_parse_env("4"), 4);
    assert_int_equal(moe_threads_parse_env("4,2"), 4);
    assert_int_equal(moe_threads_parse_env(" 8 , 3 ,1"), 8);
    assert_int_equal(moe_threads_parse_env("2147483647"), 2147483647);
    assert_int_equal(moe_threads_parse_env(NULL), 0);
    const char *bad[] = {"",    " ",   "0",    "-1",  "+4",  "abc", "4x",  "4,",
                         ",4",  "4,,2", "4,0", "4,-2", "4 2", "1.5", "2147483648",
                         "99999999999999999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (moe_threads_parse_env(bad[i]) != 0) fprintf(stderr, "accepted '%s'\n", bad[i]);
        assert_int_equal(moe_threads_parse_env(bad[i]), 0);
    }
}

static int affinity_count(void)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    assert_int_equal(sched_getaffinity(getpid(), sizeof set, &set), 0);
    return CPU_COUNT(&set);
}

/* Runs first: the first call of moe_default_threads, from many threads at once, with
 * OMP_NUM_THREADS set before it; the result is cached after. */
static void test_default_env_first_and_cached(void **state)
{
    (void)state;
    setenv("OMP_NUM_THREADS", "3,1", 1);
    int got[16];
#pragma omp parallel for num_threads(16)
    for (int i = 0; i < 16; i++) got[i] = moe_default_threads();
    for (int i = 0; i < 16; i++) assert_int_equal(got[i], 3);
    unsetenv("OMP_NUM_THREADS");
    assert_int_equal(moe_default_threads(), 3); /* cached */
}

static void test_compute_without_mpi(void **state)
{
    (void)state;
    int cpus = affinity_count();
    unsetenv("OMP_NUM_THREADS");
    assert_int_equal(moe_threads_binding(), cpus); /* no MPI: the process alone */
    assert_int_equal(moe_threads_compute(), cpus);
    setenv("OMP_NUM_THREADS", "5", 1);
    assert_int_equal(moe_threads_compute(), 5);
    assert_int_equal(moe_threads_binding(), cpus);
    setenv("OMP_NUM_THREADS", "garbage", 1);
    assert_int_equal(moe_threads_compute(), cpus);
    setenv("OMP_NUM_THREADS", "0", 1);
    assert_int_equal(moe_threads_compute(), cpus);
    unsetenv("OMP_NUM_THREADS");
    assert_int_equal(moe_default_threads(), 3); /* still the first call's */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_default_env_first_and_cached),
        cmocka_unit_test(test_split_2_2_2_2),
        cmocka_unit_test(test_all_on_same_cpus),
        cmocka_unit_test(test_unbound),
        cmocka_unit_test(test_overlapping),
        cmocka_unit_test(test_exact_fractions),
        cmocka_unit_test(test_degenerate),
        cmocka_unit_test(test_parse_env),
        cmocka_unit_test(test_compute_without_mpi),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
