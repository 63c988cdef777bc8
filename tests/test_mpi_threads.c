/*
 * test_mpi_threads.c — the default thread count under mpirun -np 1, 2, 4 (src/threads.h). The
 * test gathers the node's real affinity masks itself (sched_getaffinity, MPI_Allgather on
 * MPI_COMM_TYPE_SHARED) and checks the library against moe_threads_share on them, so it holds
 * whatever binding mpirun gave (ctest oversubscribes 2 cores: usually every rank is unbound or
 * bound to all of them, which the last checks of the first test pin down independently).
 * Odd ranks set OMP_NUM_THREADS before their first moe_default_threads and must get it; even
 * ranks leave it unset and must get the binding's share. That the ranks' environments differ
 * must not leave anyone blocked in the collective.
 */
#include <mpi.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mpi_test.h"
#include "test_util.h"

#include "moe_threads.h"

#define ENV_THREADS 7 /* odd ranks' OMP_NUM_THREADS */

/* what the test expects from the masks it gathers itself */
static int g_expect_binding;

static void test_binding_share(void **state)
{
    (void)state;
    bool ok = true;
    cpu_set_t set;
    CPU_ZERO(&set);
    CHECK(sched_getaffinity(getpid(), sizeof set, &set) == 0);
    int mine = CPU_COUNT(&set);
    uint8_t mask[sizeof(cpu_set_t)] = {0};
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &set)) mask[c / 8] |= (uint8_t)(1u << (c % 8));

    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    int n = 0, lr = 0;
    MPI_Comm_size(node, &n);
    MPI_Comm_rank(node, &lr);
    uint8_t *all = calloc((size_t)n, sizeof mask);
    MPI_Allgather(mask, (int)sizeof mask, MPI_BYTE, all, (int)sizeof mask, MPI_BYTE, node);
    g_expect_binding = moe_threads_share(mask, all, n, sizeof mask);

    /* the first call: odd ranks with OMP_NUM_THREADS set, even ranks without */
    unsetenv("OMP_NUM_THREADS");
    if (g_rank % 2) setenv("OMP_NUM_THREADS", "7", 1);
    moe_threads_init_comm(MPI_COMM_WORLD);
    int def = moe_default_threads();
    unsetenv("OMP_NUM_THREADS");
    int bind = moe_threads_binding();
    int comp = moe_threads_compute();
    fprintf(stderr, "rank %d (local %d/%d): %d CPUs bound, default %d, binding %d, expected %d\n", g_rank, lr,
            n, mine, def, bind, g_expect_binding);
    CHECK(bind == g_expect_binding);
    CHECK(comp == g_expect_binding);
    CHECK(def == (g_rank % 2 ? ENV_THREADS : g_expect_binding));
    CHECK(moe_default_threads() == def); /* cached */
    CHECK(bind >= 1 && bind <= (mine > 0 ? mine : 1));

    /* Independent of moe_threads_share: when every rank has the same mask (the usual case
     * here), the share is its CPUs / the node's ranks, at least 1. */
    bool same = true;
    for (int p = 0; p < n; p++) same = same && memcmp(all + (size_t)p * sizeof mask, mask, sizeof mask) == 0;
    int all_same = 0, one = same ? 1 : 0;
    MPI_Allreduce(&one, &all_same, 1, MPI_INT, MPI_LAND, node);
    if (all_same) CHECK(bind == (mine / n > 1 ? mine / n : 1));
    /* The node never gets more threads than the CPUs its ranks are bound to, plus one for each
     * rank whose share is below one CPU (the floor of 1). */
    uint8_t uni[sizeof(cpu_set_t)] = {0};
    for (int p = 0; p < n; p++)
        for (size_t i = 0; i < sizeof mask; i++) uni[i] |= all[(size_t)p * sizeof mask + i];
    int ucount = 0;
    for (size_t i = 0; i < sizeof uni; i++) ucount += __builtin_popcount(uni[i]);
    int lifted = mine < n ? 1 : 0; /* a share < 1 needs fewer CPUs than the node's ranks */
    int sum = 0, nlifted = 0;
    MPI_Allreduce(&bind, &sum, 1, MPI_INT, MPI_SUM, node);
    MPI_Allreduce(&lifted, &nlifted, 1, MPI_INT, MPI_SUM, node);
    CHECK(sum <= ucount + nlifted);
    free(all);
    MPI_Comm_free(&node);
    assert_true(all_true(ok));
}

static void test_env_wins(void **state)
{
    (void)state;
    bool ok = true;
    const char *vals[] = {"3", "5,2", " 2 ", "garbage", "0", "-4", "4,", ""};
    const int want[] = {3, 5, 2, 0, 0, 0, 0, 0}; /* 0: ignored, the binding's share */
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        setenv("OMP_NUM_THREADS", vals[i], 1);
        int got = moe_threads_compute(); /* collective on every rank, whatever the env */
        CHECK(got == (want[i] ? want[i] : g_expect_binding));
    }
    /* different values on different ranks: each gets its own, nobody blocks */
    char v[16];
    snprintf(v, sizeof v, "%d", g_rank + 1);
    setenv("OMP_NUM_THREADS", v, 1);
    CHECK(moe_threads_compute() == g_rank + 1);
    if (g_rank == 0) unsetenv("OMP_NUM_THREADS");
    CHECK(moe_threads_compute() == (g_rank == 0 ? g_expect_binding : g_rank + 1));
    unsetenv("OMP_NUM_THREADS");
    CHECK(moe_default_threads() == (g_rank % 2 ? ENV_THREADS : g_expect_binding)); /* cached */
    assert_true(all_true(ok));
}

int main(int argc, char **argv)
{
    mpi_test_init(&argc, &argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_binding_share),
        cmocka_unit_test(test_env_wins),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    /* after MPI_Finalize: no collective, the process alone */
    MPI_Finalize();
    if (rc == 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        sched_getaffinity(getpid(), sizeof set, &set);
        unsetenv("OMP_NUM_THREADS");
        if (moe_threads_binding() != CPU_COUNT(&set)) {
            fprintf(stderr, "rank %d: after MPI_Finalize the binding share is %d, not %d CPUs\n",
                    g_rank, moe_threads_binding(), CPU_COUNT(&set));
            rc = 1;
        }
    }
    return rc;
}
