/* cli_compare.c — `moe-ep compare`: one tensor of two safetensors files, by docs/DESIGN.md's rule
 * (global relative error AND the worst row within 10x; NaN never passes). How a user checks our
 * output against HuggingFace's, and how the tests check multi-rank runs against one rank.
 * Nothing compared (an empty tensor, every row masked) is a failure, not a pass. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "cli.h"
#include "cli_opts.h"
#include "dtype.h"
#include "safetensors.h"

static double *load(const moe_st_file *f, const char *name, size_t *n, int64_t *cols, moe_error *err)
{
    moe_tensor v;
    if (moe_st_get(f, name, &v, err) != MOE_OK) return NULL;
    if (!moe_dtype_is_float(v.dtype) && v.dtype != MOE_DTYPE_I32 && v.dtype != MOE_DTYPE_I64) {
        moe_fail(err, MOE_ERR_FORMAT, "tensor '%s' has a dtype compare does not read", name);
        return NULL;
    }
    *n = moe_tensor_numel(&v);
    *cols = v.ndim ? v.shape[v.ndim - 1] : 1;
    double *d = malloc(sizeof(double) * (*n + 1));
    if (!d) { moe_fail(err, MOE_ERR_NOMEM, "compare: %zu elements", *n); return NULL; }
    for (size_t i = 0; i < *n; i++) d[i] = moe_load_elem(v.dtype, v.data, i);
    return d;
}

int cli_compare(int argc, char **argv)
{
    const char *tensor = "output", *ref_tensor = NULL, *mask = NULL, *tol_s = "1e-2";
    cli_opt opts[] = {
        {"tensor", OPT_STRING, "NAME", "tensor to compare (default output)", .str = &tensor},
        {"ref-tensor", OPT_STRING, "NAME", "its name in the reference file (default: the same)", .str = &ref_tensor},
        {"tol", OPT_STRING, "X", "relative tolerance, a finite number > 0; the worst row may reach 10x (default 1e-2)", .str = &tol_s},
        {"mask", OPT_STRING, "NAME", "a [rows] tensor of the reference file; rows where it is non-zero are left out (e.g. tie_mask)", .str = &mask},
        {0},
    };
    const char *syn = "GOT.safetensors REF.safetensors [--tensor NAME] [--ref-tensor NAME] [--tol X] [--mask NAME]";
    const char *desc = "Compares one tensor of GOT against REF: ||got-ref||/||ref|| <= tol and every row within\n"
                       "10x tol (rows = the last dimension); a NaN or Inf fails its row. Exit 0 when within,\n"
                       "1 when not or when nothing was compared (no elements, every row masked), 2 on bad usage.";
    /* two positional file names first */
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        cli_print_help("compare", syn, desc, opts);
        return 0;
    }
    if (argc < 3 || argv[1][0] == '-' || argv[2][0] == '-') {
        fprintf(stderr, "moe-ep compare: expects two files, GOT and REF, before the options (see --help)\n");
        return 2;
    }
    const char *got_path = argv[1], *ref_path = argv[2];
    argv[2] = argv[0];
    int rc = cli_parse("compare", syn, desc, opts, argc - 2, argv + 2);
    if (rc) return rc == 1 ? 0 : 2;
    char *end;
    double tol = strtod(tol_s, &end);
    if (end == tol_s || *end || !isfinite(tol) || !(tol > 0)) {
        fprintf(stderr, "moe-ep compare: --tol expects a positive number (finite, > 0), got '%s'\n", tol_s);
        return 2;
    }
    if (!ref_tensor) ref_tensor = tensor;
    moe_error err = {0};
    moe_st_file fg, fr;
    memset(&fg, 0, sizeof fg);
    memset(&fr, 0, sizeof fr);
    double *g = NULL, *r = NULL, *m = NULL;
    size_t ng = 0, nr = 0, nm = 0;
    int64_t cg = 1, cr = 1, cm = 1;
    int status = 1;
    if (moe_st_open(got_path, &fg, &err) != MOE_OK || moe_st_open(ref_path, &fr, &err) != MOE_OK) goto fail;
    if (!(g = load(&fg, tensor, &ng, &cg, &err)) || !(r = load(&fr, ref_tensor, &nr, &cr, &err))) goto fail;
    if (ng != nr || cg != cr) {
        moe_fail(&err, MOE_ERR_FORMAT, "'%s' has %zu elements (rows of %lld) but the reference '%s' has %zu (rows of %lld)",
                 tensor, ng, (long long)cg, ref_tensor, nr, (long long)cr);
        goto fail;
    }
    if (ng == 0) {
        moe_fail(&err, MOE_ERR_CHECK_FAILED, "nothing compared: '%s' has no elements (%s)", tensor, got_path);
        goto fail;
    }
    size_t rows = cg ? ng / (size_t)cg : 0, kept = rows;
    if (mask) {
        if (!(m = load(&fr, mask, &nm, &cm, &err))) goto fail;
        if (nm != rows) {
            moe_fail(&err, MOE_ERR_FORMAT, "mask '%s' has %zu entries for %zu rows", mask, nm, rows);
            goto fail;
        }
        kept = 0;
        for (size_t i = 0; i < rows; i++) {
            if (m[i] != 0) continue;
            memmove(g + kept * cg, g + i * cg, (size_t)cg * sizeof(double));
            memmove(r + kept * cg, r + i * cg, (size_t)cg * sizeof(double));
            kept++;
        }
        if (kept == 0) {
            moe_fail(&err, MOE_ERR_CHECK_FAILED, "nothing compared: mask '%s' leaves out all %zu rows", mask, rows);
            goto fail;
        }
    }
    /* Rows that differ: a NaN or Inf in either tensor (no error can be measured there), or a
     * relative error not within 10x tol (a zero reference row must stay zero). Counted here so
     * the report can say how many; the verdict is the shared rule's. */
    size_t differ = 0, nonfinite = 0;
    for (size_t i = 0; i < kept; i++) {
        double num = 0, den = 0;
        bool bad = false;
        for (size_t j = 0; j < (size_t)cg; j++) {
            double a = g[i * cg + j], b = r[i * cg + j];
            if (!isfinite(a) || !isfinite(b)) bad = true;
            num += (a - b) * (a - b);
            den += b * b;
        }
        double e = den == 0 ? (num == 0 ? 0 : INFINITY) : sqrt(num / den);
        nonfinite += bad;
        differ += bad || !(e <= 10 * tol);
    }
    moe_check_report rep;
    moe_check_report_init(&rep);
    char what[64];
    snprintf(what, sizeof what, "%zu rows x %lld%s", kept, (long long)cg, kept < rows ? " (masked)" : "");
    moe_check_compare(&rep, tensor, what, g, r, kept, (size_t)cg, tol);
    /* A NaN makes the errors NaN, which moe_check_print takes for an exact stage's counts
     * (printed through a (long) cast: a negative count). Report them as unbounded, next to the
     * note that says why; a row with a NaN or Inf is the worst there is. */
    moe_check_row *row = &rep.rows[0];
    if (isnan(row->rel_err)) row->rel_err = INFINITY;
    if (nonfinite || isnan(row->worst_err)) row->worst_err = INFINITY;
    if (nonfinite && !row->note[0]) snprintf(row->note, sizeof row->note, "NaN/Inf present");
    if (differ || nonfinite) row->pass = rep.all_pass = false;
    moe_check_print(&rep, stdout);
    printf("%zu of %zu rows differ: %zu with NaN/Inf, %zu beyond 10x tol\n", differ, kept, nonfinite,
           differ - nonfinite);
    status = rep.all_pass ? 0 : 1;
    goto out;
fail:
    fprintf(stderr, "moe-ep compare: %s\n", err.msg);
    status = err.status == MOE_ERR_INVALID_ARG ? 2 : 1;
out:
    free(g); free(r); free(m);
    if (fg.map) moe_st_close(&fg);
    if (fr.map) moe_st_close(&fr);
    return status;
}
