/* cli_opts.c — see cli_opts.h. */
#include "cli_opts.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

void cli_print_help(const char *cmd, const char *synopsis, const char *description,
                    const cli_opt *opts)
{
    printf("usage: moe-ep %s %s\n\n%s\n\noptions:\n", cmd, synopsis, description);
    for (const cli_opt *o = opts; o->name; o++) {
        char left[64], al[8] = "";
        if (o->alias) snprintf(al, sizeof al, "-%c, ", o->alias);
        if (o->kind == OPT_FLAG) snprintf(left, sizeof left, "%s--%s", al, o->name);
        else snprintf(left, sizeof left, "%s--%s %s", al, o->name, o->metavar ? o->metavar : "X");
        printf("  %-28s %s\n", left, o->help);
    }
    printf("  %-28s %s\n", "--help", "show this help and exit");
}

static cli_opt *find(cli_opt *opts, const char *name, size_t len)
{
    for (cli_opt *o = opts; o->name; o++)
        if (strlen(o->name) == len && strncmp(o->name, name, len) == 0) return o;
    return NULL;
}

int cli_parse(const char *cmd, const char *synopsis, const char *description, cli_opt *opts,
              int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            cli_print_help(cmd, synopsis, description, opts);
            return 1;
        }
        cli_opt *o = NULL;
        const char *eq = NULL;
        size_t len = 0;
        if (a[0] == '-' && a[1] && a[1] != '-' && a[2] == '\0') {
            for (cli_opt *q = opts; q->name; q++)
                if (q->alias == a[1]) o = q;
            len = 0;
            if (!o) {
                fprintf(stderr, "moe-ep %s: unknown option '%s' (see 'moe-ep %s --help')\n", cmd, a, cmd);
                return 2;
            }
        } else if (strncmp(a, "--", 2) != 0) {
            fprintf(stderr, "moe-ep %s: unexpected argument '%s' (options start with --; see --help)\n", cmd, a);
            return 2;
        } else {
            const char *name = a + 2;
            eq = strchr(name, '=');
            len = eq ? (size_t)(eq - name) : strlen(name);
            o = find(opts, name, len);
        }
        if (!o) {
            fprintf(stderr, "moe-ep %s: unknown option '%.*s' (see 'moe-ep %s --help')\n", cmd,
                    (int)(len + 2), a, cmd);
            return 2;
        }
        o->seen = true;
        if (o->kind == OPT_FLAG) {
            if (eq) {
                fprintf(stderr, "moe-ep %s: --%s takes no value\n", cmd, o->name);
                return 2;
            }
            *o->flag = true;
            continue;
        }
        const char *val = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (!val) {
            fprintf(stderr, "moe-ep %s: --%s expects %s\n", cmd, o->name,
                    o->metavar ? o->metavar : "a value");
            return 2;
        }
        if (o->kind == OPT_STRING) {
            *o->str = val;
        } else if (o->kind == OPT_INT) {
            char *end;
            errno = 0;
            long v = strtol(val, &end, 10);
            if (errno || *end || end == val || v < o->min || v > INT_MAX) {
                fprintf(stderr, "moe-ep %s: --%s expects an integer >= %d, got '%s'\n", cmd,
                        o->name, o->min, val);
                return 2;
            }
            *o->i = (int)v;
        } else {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(val, &end, 0);
            if (errno || *end || end == val || val[0] == '-') {
                fprintf(stderr, "moe-ep %s: --%s expects a non-negative integer, got '%s'\n",
                        cmd, o->name, val);
                return 2;
            }
            *o->u64 = (uint64_t)v;
        }
    }
    return 0;
}

int cli_require(const char *cmd, const cli_opt *opts, const char *name)
{
    for (const cli_opt *o = opts; o->name; o++)
        if (strcmp(o->name, name) == 0) {
            if (o->seen) return 0;
            fprintf(stderr, "moe-ep %s: missing required option --%s %s (see --help)\n", cmd,
                    name, o->metavar ? o->metavar : "");
            return 2;
        }
    return 2;
}

bool cli_gpu_available(void)
{
#ifdef MOE_HAVE_CUDA
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#else
    return false;
#endif
}

bool cli_parse_backend(const char *s, moe_backend *out)
{
    if (!s || strcmp(s, "auto") == 0) {
        *out = cli_gpu_available() ? MOE_BACKEND_CUDA : MOE_BACKEND_CPU;
        return true;
    }
    if (strcmp(s, "cpu") == 0) { *out = MOE_BACKEND_CPU; return true; }
    if (strcmp(s, "cuda") == 0 || strcmp(s, "gpu") == 0) { *out = MOE_BACKEND_CUDA; return true; }
    return false;
}
