/*
 * test_topo.c — rank placement with hwloc, against hand-written XML topologies:
 *   fixtures/topo/dgx8-2socket.xml  2 packages = 2 NUMA nodes of 8 cores; per package a host
 *       bridge with two PCIe switches: GPUs 4p,4p+1 and NIC mlx5_p on switch 0, GPUs 4p+2,4p+3
 *       on switch 1 (bus ids 11,12,14,15 under package 0; 91,92,94,95 under package 1)
 *   fixtures/topo/cpu-2socket.xml   the same packages and no PCI devices
 * The expected placements below come from how those files were built (topo.h's rules), not
 * from running the code.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

#include "ep/topo.h"

static moe_topo *load(const char *name)
{
    char path[512];
    snprintf(path, sizeof path, "%s/topo/%s", MOE_FIXTURE_DIR, name);
    moe_topo *t = NULL;
    moe_error err;
    moe_error_clear(&err);
    moe_status st = moe_topo_load(path, &t, &err);
    if (st != MOE_OK) fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(st, MOE_OK);
    return t;
}

static void test_dgx_one_rank_per_gpu(void **state)
{
    (void)state;
    moe_topo *t = load("dgx8-2socket.xml");
    assert_int_equal(moe_topo_num_gpus(t), 8);
    assert_int_equal(moe_topo_num_numa(t), 2);
    assert_int_equal(moe_topo_num_nics(t), 2);
    static const char *bus[8] = {"0000:11:00.0", "0000:12:00.0", "0000:14:00.0", "0000:15:00.0",
                                 "0000:91:00.0", "0000:92:00.0", "0000:94:00.0", "0000:95:00.0"};
    moe_topo_binding b[8];
    moe_error err;
    for (int i = 0; i < 8; i++) {
        assert_int_equal(moe_topo_pick(t, i, 8, &b[i], &err), MOE_OK);
        int pkg = i / 4;
        assert_int_equal(b[i].gpu, i);
        assert_string_equal(b[i].gpu_busid, bus[i]);
        assert_int_equal(b[i].numa, pkg);
        assert_string_equal(b[i].cpuset, pkg == 0 ? "0-7" : "8-15");
        assert_int_equal(b[i].ncores, 8);
        assert_int_equal(b[i].threads_hint, 2); /* 8 cores, 4 ranks per NUMA node */
        assert_string_equal(b[i].nic, pkg == 0 ? "mlx5_0" : "mlx5_1");
        assert_string_equal(b[i].nic_busid, pkg == 0 ? "0000:13:00.0" : "0000:93:00.0");
    }
    /* Binding needs this machine's topology, not a file's. */
    moe_error_clear(&err);
    assert_int_equal(moe_topo_bind(t, &b[0], &err), MOE_ERR_UNSUPPORTED);
    assert_non_null(strstr(err.msg, "XML"));

    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    moe_topo_print(f, t, b, 8);
    fclose(f);
    fprintf(stderr, "%s", text);
    assert_non_null(strstr(text, "8 GPU(s)"));
    assert_non_null(strstr(text, "2 NUMA node(s)"));
    assert_non_null(strstr(text, "NIC 1: mlx5_1 (0000:93:00.0) NUMA 1"));
    assert_non_null(strstr(text, "GPU 5: 0000:92:00.0 [10de:2330] NUMA 1"));
    assert_non_null(strstr(text, "local rank 6/8: GPU 6 0000:94:00.0, NUMA 1, cpus 8-15"));
    free(text);
    moe_topo_destroy(t);
}

static void test_dgx_shared_gpus(void **state)
{
    (void)state;
    moe_topo *t = load("dgx8-2socket.xml");
    moe_error err;
    moe_topo_binding b;
    /* 16 ranks on 8 GPUs (MPI transport): rank i -> GPU i mod 8, 8 ranks per NUMA node. */
    for (int i = 0; i < 16; i++) {
        assert_int_equal(moe_topo_pick(t, i, 16, &b, &err), MOE_OK);
        assert_int_equal(b.gpu, i % 8);
        assert_int_equal(b.numa, (i % 8) / 4);
        assert_int_equal(b.threads_hint, 1);
    }
    /* 2 ranks: GPUs 0 and 1, both near package 0, sharing its 8 cores. */
    assert_int_equal(moe_topo_pick(t, 1, 2, &b, &err), MOE_OK);
    assert_int_equal(b.gpu, 1);
    assert_int_equal(b.numa, 0);
    assert_int_equal(b.threads_hint, 4);
    assert_string_equal(b.nic, "mlx5_0");
    /* GPU 3 is behind the other switch of package 0: mlx5_0 is still the nearest NIC. */
    assert_int_equal(moe_topo_pick(t, 3, 8, &b, &err), MOE_OK);
    assert_string_equal(b.nic, "mlx5_0");
    /* bad local ranks */
    moe_error_clear(&err);
    assert_int_equal(moe_topo_pick(t, 8, 8, &b, &err), MOE_ERR_INVALID_ARG);
    assert_int_equal(moe_topo_pick(t, 0, 0, &b, &err), MOE_ERR_INVALID_ARG);
    moe_topo_destroy(t);
}

static void test_cpu_only(void **state)
{
    (void)state;
    moe_topo *t = load("cpu-2socket.xml");
    assert_int_equal(moe_topo_num_gpus(t), 0);
    assert_int_equal(moe_topo_num_nics(t), 0);
    moe_error err;
    moe_topo_binding b;
    /* 4 ranks, no GPU: NUMA nodes dealt out in blocks (0,0,1,1), 4 threads each. */
    for (int i = 0; i < 4; i++) {
        assert_int_equal(moe_topo_pick(t, i, 4, &b, &err), MOE_OK);
        assert_int_equal(b.gpu, -1);
        assert_int_equal(b.numa, i / 2);
        assert_string_equal(b.cpuset, i < 2 ? "0-7" : "8-15");
        assert_int_equal(b.threads_hint, 4);
        assert_string_equal(b.nic, "");
    }
    moe_topo_destroy(t);
}

static void test_this_machine_and_errors(void **state)
{
    (void)state;
    moe_topo *t = NULL;
    moe_error err;
    moe_error_clear(&err);
    assert_int_equal(moe_topo_load(NULL, &t, &err), MOE_OK);
    moe_topo_binding b;
    assert_int_equal(moe_topo_pick(t, 0, 1, &b, &err), MOE_OK);
    assert_true(b.ncores >= 1);
    assert_true(strlen(b.cpuset) > 0);
    moe_topo_print(stderr, t, &b, 1);
    moe_topo_destroy(t);
    t = NULL;
    moe_error_clear(&err);
    assert_int_equal(moe_topo_load(MOE_FIXTURE_DIR "/topo/missing.xml", &t, &err), MOE_ERR_FORMAT);
    assert_null(t);
    assert_non_null(strstr(err.msg, "missing.xml"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dgx_one_rank_per_gpu),
        cmocka_unit_test(test_dgx_shared_gpus),
        cmocka_unit_test(test_cpu_only),
        cmocka_unit_test(test_this_machine_and_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
