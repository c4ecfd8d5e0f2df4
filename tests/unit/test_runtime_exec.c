/* test_runtime_exec.c - the executor on hand-built plans with real shared
 * libraries: numbers through libffi (f32, f64, i64, pointers), user
 * libraries and where they may load from, missing symbols, kernel errors,
 * device selection. */
#include <libgen.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "test_runtime_plan.h"
#include "../../runtime/exec.h"

static int has(const char *s, const char *sub) { return strstr(s, sub) != NULL; }

/* tokens/targets/loss roles plus y = fill(1.5) + fill(2.25) and a user axpy */
static void small_plan(pb *b, const char *userlib, const char *extra_kernel)
{
    pb_init(b);
    pb_tensor(b, "tokens", PLAN_I32, PLAN_ST_INPUT, PLAN_ROLE_TOKENS, 2, (int64_t)2, (int64_t)8);
    pb_tensor(b, "targets", PLAN_I32, PLAN_ST_INPUT, PLAN_ROLE_TARGETS, 2, (int64_t)2, (int64_t)8);
    pb_tensor(b, "loss", PLAN_F32, PLAN_ST_ACT, PLAN_ROLE_LOSS, 1, (int64_t)1);
    uint32_t a = pb_tensor(b, "a", PLAN_F32, PLAN_ST_ACT, 0, 1, (int64_t)5);
    uint32_t c = pb_tensor(b, "b", PLAN_F32, PLAN_ST_ACT, 0, 1, (int64_t)5);
    uint32_t y = pb_tensor(b, "y", PLAN_F32, PLAN_ST_ACT, 0, 1, (int64_t)5);
    uint32_t kf = pb_kernel(b, "moek_fill", 0, "tif");
    uint32_t ka = pb_kernel(b, "moek_add_fwd", 0, "ttti");
    pb_op(b, kf, PLAN_PHASE_FORWARD, "fill a", 2, (int64_t)a, (int64_t)5, 1.5);
    pb_op(b, kf, PLAN_PHASE_FORWARD, "fill b", 3, (int64_t)c, (int64_t)4, 2.25);
    pb_op(b, ka, PLAN_PHASE_FORWARD, "a + b", 4, (int64_t)a, (int64_t)c, (int64_t)y, (int64_t)5);
    if (userlib) {
        uint32_t lib = pb_lib(b, userlib);
        uint32_t kx = pb_kernel(b, "test_axpy_f64", lib, "dtti");
        pb_op(b, kx, PLAN_PHASE_FORWARD, "axpy", 5, 0.5, (int64_t)a, (int64_t)y, (int64_t)5);
    }
    if (extra_kernel) {
        uint32_t k = pb_kernel(b, extra_kernel, 0, "ti");
        pb_op(b, k, PLAN_PHASE_FORWARD, "mystery op", 7, (int64_t)a, (int64_t)1);
    }
}

static int open_plan(const pb *b, const char *path, plan_file *pf, exec_state *ex,
                     exec_opts *o, char *err, size_t n)
{
    if (pb_write(b, path) || plan_load(path, pf, err, n))
        return -1;
    o->plan_path = path;
    if (exec_open(ex, pf, o, err, n)) {
        plan_close(pf);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    (void)argc;
    unsetenv("MOEC_KERNELS");
    char dir[] = "/tmp/moec_rt_execXXXXXX", other[300], path[300], err[2048] = "";
    if (!mkdtemp(dir)) {
        CHECK("exec.tmpdir", 0, "mkdtemp");
        CHECK_DONE();
    }
    snprintf(other, sizeof other, "%s/other", dir);
    mkdir(other, 0755);
    if (pb_build_lib(dir, "libmoek_cpu.so", NULL) || pb_build_lib(dir, "libtestops.so", NULL) ||
        pb_build_lib(other, "libtestops.so", NULL)) {
        SKIP("exec.all", "no C compiler to build the test kernel library");
        return 0;
    }
    exec_opts o = {"cpu", NULL, dir, NULL, 0, 0, NULL};
    pb b;
    plan_file pf;
    exec_state ex;
    snprintf(path, sizeof path, "%s/plan.bin", dir);

    /* numbers through libffi: f32 immediates, i64 counts, f64 in a user lib */
    small_plan(&b, "libtestops.so", NULL);
    char *logbuf = NULL;
    size_t logn = 0;
    o.log = open_memstream(&logbuf, &logn);
    int rc = open_plan(&b, path, &pf, &ex, &o, err, sizeof err);
    fclose(o.log);
    o.log = NULL;
    CHECK("exec.open", rc == 0, "%s", err);
    if (rc == 0) {
        CHECK("exec.log", has(logbuf, "run: device cpu: loaded ") && has(logbuf, "/libmoek_cpu.so") &&
              has(logbuf, "run: user library: loaded ") && has(logbuf, "/libtestops.so"), "%s", logbuf);
        float y[5] = {0};
        rc = exec_phase(&ex, PLAN_PHASE_FORWARD, err, sizeof err);
        CHECK("exec.phase", rc == 0, "%s", err);
        exec_read(&ex, 5, 0, y, sizeof y, err, sizeof err);
        /* b[4] was never filled (n = 4): 1.5 + 0 + 0.75 */
        CHECK("exec.numbers", y[0] == 4.5f && y[3] == 4.5f && y[4] == 2.25f,
              "y = %g %g %g", (double)y[0], (double)y[3], (double)y[4]);
        CHECK("exec.calls_flat", ex.phase_begin[1] == 4 && ex.phase_begin[3] == 4,
              "phase ranges %llu %llu", (unsigned long long)ex.phase_begin[1],
              (unsigned long long)ex.phase_begin[3]);
        float w[2] = {7, 8}, r[2];
        CHECK("exec.write_read", exec_write(&ex, 3, 4, w, 8, err, sizeof err) == 0 &&
              exec_read(&ex, 3, 4, r, 8, err, sizeof err) == 0 && r[0] == 7 && r[1] == 8, "%s", err);
        CHECK("exec.range", exec_read(&ex, 3, 16, r, 8, err, sizeof err) != 0 &&
              has(err, "out of range"), "%s", err);
        exec_close(&ex);
        plan_close(&pf);
    }
    free(logbuf);

    /* a missing kernel names the symbol, the library and the source line */
    small_plan(&b, NULL, "moek_nope");
    rc = open_plan(&b, path, &pf, &ex, &o, err, sizeof err);
    CHECK("exec.missing_symbol", rc != 0 && has(err, "kernel moek_nope not found in libmoek_cpu.so, "
          "needed by op 3 (mystery op, test.moe:7:3)"), "%s", err);

    small_plan(&b, "libmissing.so", NULL);
    rc = open_plan(&b, path, &pf, &ex, &o, err, sizeof err);
    CHECK("exec.userlib_missing", rc != 0 && has(err, "user library libmissing.so not found next "
          "to the plan"), "%s", err);

    /* a library reached through .. from the plan's directory is refused */
    small_plan(&b, "other/libtestops.so", NULL);
    rc = open_plan(&b, path, &pf, &ex, &o, err, sizeof err);
    CHECK("exec.userlib_outside", rc != 0 && has(err, "is outside the allowed directories") &&
          has(err, "--allow-lib"), "%s", err);
    const char *allow[] = {other};
    o.allow_dirs = allow;
    o.nallow = 1;
    rc = open_plan(&b, path, &pf, &ex, &o, err, sizeof err);
    CHECK("exec.userlib_allowed", rc == 0, "%s", err);
    if (rc == 0) {
        exec_close(&ex);
        plan_close(&pf);
    }
    o.allow_dirs = NULL;
    o.nallow = 0;

    /* a kernel that reports bad data names the op and its .moe line */
    pb_init(&b);
    pb_bigram(&b, 1);
    rc = open_plan(&b, path, &pf, &ex, &o, err, sizeof err);
    CHECK("exec.bigram_open", rc == 0, "%s", err);
    if (rc == 0) {
        int32_t tok[16];
        for (int i = 0; i < 16; i++)
            tok[i] = i == 5 ? 300 : i;
        exec_write(&ex, 0, 0, tok, sizeof tok, err, sizeof err);
        rc = exec_phase(&ex, PLAN_PHASE_FORWARD, err, sizeof err);
        CHECK("exec.kernel_status", rc != 0 && has(err, "kernel error in op 0 (embedding, "
              "test.moe:4:3): an index read from data is out of range (status 1)"), "%s", err);
        tok[5] = 5;
        exec_write(&ex, 0, 0, tok, sizeof tok, err, sizeof err);
        CHECK("exec.status_cleared", exec_phase(&ex, PLAN_PHASE_FORWARD, err, sizeof err) == 0,
              "%s", err);
        exec_close(&ex);
        plan_close(&pf);
    }

    /* device selection */
    small_plan(&b, NULL, NULL);
    o.device = "cuda";
    rc = open_plan(&b, path, &pf, &ex, &o, err, sizeof err);
    CHECK("exec.device_cuda_missing", rc != 0 && has(err, "cannot use device cuda") &&
          has(err, "--device cpu"), "%s", err);
    o.device = "tpu";
    rc = open_plan(&b, path, &pf, &ex, &o, err, sizeof err);
    CHECK("exec.device_unknown", rc != 0 && has(err, "unknown device 'tpu'"), "%s", err);
    o.device = NULL;   /* auto: no CUDA library here, so the CPU one */
    rc = open_plan(&b, path, &pf, &ex, &o, err, sizeof err);
    CHECK("exec.device_auto", rc == 0 && strcmp(ex.device, "cpu") == 0, "%s", err);
    if (rc == 0) {
        exec_close(&ex);
        plan_close(&pf);
    }
    o.device = "cpu";
    o.exe_dir = other;   /* holds no device library */
    rc = open_plan(&b, path, &pf, &ex, &o, err, sizeof err);
    CHECK("exec.no_device_lib", rc != 0 && has(err, "cannot load libmoek_cpu.so (not found; "
          "searched ") && has(err, "MOEC_KERNELS"), "%s", err);
    /* a library without the device services */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "echo 'void moek_fill(void){}' > %s/k.c && cc -shared -fPIC -o "
             "%s/libmoek_cpu.so %s/k.c", other, other, other);
    if (system(cmd) == 0) {
        rc = open_plan(&b, path, &pf, &ex, &o, err, sizeof err);
        CHECK("exec.no_services", rc != 0 && has(err, "libmoek_cpu.so lacks moek_device_count"),
              "%s", err);
    }
    o.exe_dir = dir;

    /* the real CPU kernel library, when this build has one */
    char real[1024];
    snprintf(real, sizeof real, "%s", argv[0]);
    char *bdir = dirname(dirname(real));   /* BUILD/tests/x -> BUILD */
    char reallib[1100];
    snprintf(reallib, sizeof reallib, "%s/libmoek_cpu.so", bdir);
    if (access(reallib, R_OK) == 0) {
        setenv("MOEC_KERNELS", bdir, 1);
        small_plan(&b, NULL, NULL);
        rc = open_plan(&b, path, &pf, &ex, &o, err, sizeof err);
        CHECK("exec.cpu_lib_open", rc == 0, "%s", err);
        if (rc == 0) {
            float y[5];
            rc = exec_phase(&ex, PLAN_PHASE_FORWARD, err, sizeof err);
            exec_read(&ex, 5, 0, y, sizeof y, err, sizeof err);
            CHECK("exec.cpu_lib_numbers", rc == 0 && y[0] == 3.75f && y[4] == 1.5f,
                  "rc %d y %g %g %s", rc, (double)y[0], (double)y[4], err);
            exec_close(&ex);
            plan_close(&pf);
        }
        unsetenv("MOEC_KERNELS");
    } else {
        SKIP("exec.cpu_lib", "%s not built", reallib);
    }
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        printf("# could not remove %s\n", dir);
    CHECK_DONE();
}
