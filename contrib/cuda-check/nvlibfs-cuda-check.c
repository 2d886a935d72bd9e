/*
 * nvlibfs-cuda-check: does CUDA work here, with the driver the loader
 * finds? Uses only the driver API of libcuda.so.1 (no toolkit, no
 * headers): cuInit, a context, a PTX kernel loaded with cuModuleLoadData
 * (so the driver's JIT compiler, libnvidia-ptxjitcompiler, is loaded too),
 * a launch, a copy back, and every element checked against the CPU.
 * Prints the device, the driver version, and where libcuda and the JIT
 * compiler were loaded from.
 *
 *   cc -O2 -o nvlibfs-cuda-check nvlibfs-cuda-check.c -ldl -lm
 *
 * Exit: 0 all checked; 2 no libcuda.so.1; 3 libcuda.so.1 lacks the driver
 * API; 4 a CUDA call failed; 5 a wrong result.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext, *CUmodule, *CUfunction, *CUstream;
typedef unsigned long long CUdeviceptr;

/* y[i] = a * x[i] + y[i], one thread an element; sm_50 so the JIT builds
 * it for whatever GPU is there. */
static const char PTX[] =
    ".version 7.0\n"
    ".target sm_50\n"
    ".address_size 64\n"
    ".visible .entry saxpy(.param .u32 n, .param .f32 a, .param .u64 x, .param .u64 y)\n"
    "{\n"
    "  .reg .pred %p;\n"
    "  .reg .b32 %r<6>;\n"
    "  .reg .f32 %f<4>;\n"
    "  .reg .b64 %rd<8>;\n"
    "  ld.param.u32 %r1, [n];\n"
    "  ld.param.f32 %f1, [a];\n"
    "  ld.param.u64 %rd1, [x];\n"
    "  ld.param.u64 %rd2, [y];\n"
    "  mov.u32 %r2, %ctaid.x;\n"
    "  mov.u32 %r3, %ntid.x;\n"
    "  mov.u32 %r4, %tid.x;\n"
    "  mad.lo.s32 %r5, %r2, %r3, %r4;\n"
    "  setp.ge.u32 %p, %r5, %r1;\n"
    "  @%p bra DONE;\n"
    "  cvta.to.global.u64 %rd3, %rd1;\n"
    "  cvta.to.global.u64 %rd4, %rd2;\n"
    "  mul.wide.u32 %rd5, %r5, 4;\n"
    "  add.s64 %rd6, %rd3, %rd5;\n"
    "  add.s64 %rd7, %rd4, %rd5;\n"
    "  ld.global.f32 %f2, [%rd6];\n"
    "  ld.global.f32 %f3, [%rd7];\n"
    "  fma.rn.f32 %f3, %f1, %f2, %f3;\n"
    "  st.global.f32 [%rd7], %f3;\n"
    "DONE:\n"
    "  ret;\n"
    "}\n";

static void *cuda;
static CUresult (*cuGetErrorString)(CUresult, const char **);

static void *need(const char *name) {
    void *f = dlsym(cuda, name);
    if (!f) {
        struct link_map *map = 0;
        dlinfo(cuda, RTLD_DI_LINKMAP, &map);
        fprintf(stderr, "libcuda.so.1 (%s) has no %s: not the NVIDIA driver\n", map ? map->l_name : "?", name);
        exit(3);
    }
    return f;
}

static void check(CUresult r, const char *what) {
    if (r != 0) {
        const char *why = "unknown error";
        if (cuGetErrorString) cuGetErrorString(r, &why);
        fprintf(stderr, "%s failed: %s (CUresult %d)\n", what, why, r);
        exit(4);
    }
}

/* Where a library whose name contains `part` is mapped in this process. */
static void print_mapped(const char *label, const char *part) {
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[4096];
    while (maps && fgets(line, sizeof line, maps)) {
        char *path = strchr(line, '/');
        if (path && strstr(path, part)) {
            path[strcspn(path, "\n")] = 0;
            printf("%s %s\n", label, path);
            fclose(maps);
            return;
        }
    }
    if (maps) fclose(maps);
    printf("%s not loaded\n", label);
}

int main(void) {
    cuda = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cuda) {
        fprintf(stderr, "no CUDA driver: %s\n", dlerror());
        return 2;
    }
    cuGetErrorString = (CUresult(*)(CUresult, const char **))dlsym(cuda, "cuGetErrorString");
    CUresult (*cuInit)(unsigned) = need("cuInit");
    CUresult (*cuDriverGetVersion)(int *) = need("cuDriverGetVersion");
    CUresult (*cuDeviceGet)(CUdevice *, int) = need("cuDeviceGet");
    CUresult (*cuDeviceGetName)(char *, int, CUdevice) = need("cuDeviceGetName");
    CUresult (*cuCtxCreate)(CUcontext *, unsigned, CUdevice) = need("cuCtxCreate_v2");
    CUresult (*cuModuleLoadData)(CUmodule *, const void *) = need("cuModuleLoadData");
    CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *) = need("cuModuleGetFunction");
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t) = need("cuMemAlloc_v2");
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t) = need("cuMemcpyHtoD_v2");
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t) = need("cuMemcpyDtoH_v2");
    CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                               CUstream, void **, void **) = need("cuLaunchKernel");
    CUresult (*cuCtxSynchronize)(void) = need("cuCtxSynchronize");
    CUresult (*cuCtxDestroy)(CUcontext) = need("cuCtxDestroy_v2");

    print_mapped("libcuda", "libcuda.so");
    /* Needs no GPU: on a machine without one, this line still shows which
     * driver the loader found. */
    int version = 0;
    check(cuDriverGetVersion(&version), "cuDriverGetVersion");
    printf("driver API %d.%d\n", version / 1000, version % 1000 / 10);
    fflush(stdout);
    check(cuInit(0), "cuInit");
    CUdevice dev;
    check(cuDeviceGet(&dev, 0), "cuDeviceGet");
    char name[256] = {0};
    check(cuDeviceGetName(name, sizeof name - 1, dev), "cuDeviceGetName");
    CUcontext ctx;
    check(cuCtxCreate(&ctx, 0, dev), "cuCtxCreate");
    CUmodule module;
    check(cuModuleLoadData(&module, PTX), "cuModuleLoadData (PTX, through the driver's JIT compiler)");
    print_mapped("ptxjitcompiler", "libnvidia-ptxjitcompiler.so");
    CUfunction saxpy;
    check(cuModuleGetFunction(&saxpy, module, "saxpy"), "cuModuleGetFunction");

    unsigned n = 1u << 20;
    float a = 3.0f, *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y), *out = malloc(n * sizeof *out);
    for (unsigned i = 0; i < n; i++) {
        x[i] = (float)i * 0.5f;
        y[i] = 2.0f - (float)i * 0.25f;
    }
    CUdeviceptr dx, dy;
    check(cuMemAlloc(&dx, n * sizeof *x), "cuMemAlloc");
    check(cuMemAlloc(&dy, n * sizeof *y), "cuMemAlloc");
    check(cuMemcpyHtoD(dx, x, n * sizeof *x), "cuMemcpyHtoD");
    check(cuMemcpyHtoD(dy, y, n * sizeof *y), "cuMemcpyHtoD");
    void *args[] = {&n, &a, &dx, &dy};
    check(cuLaunchKernel(saxpy, (n + 255) / 256, 1, 1, 256, 1, 1, 0, 0, args, 0), "cuLaunchKernel");
    check(cuCtxSynchronize(), "cuCtxSynchronize");
    check(cuMemcpyDtoH(out, dy, n * sizeof *out), "cuMemcpyDtoH");
    for (unsigned i = 0; i < n; i++) {
        float want = fmaf(a, x[i], y[i]);
        if (out[i] != want) {
            fprintf(stderr, "element %u: GPU %.9g, CPU %.9g\n", i, out[i], want);
            return 5;
        }
    }
    check(cuCtxDestroy(ctx), "cuCtxDestroy");
    printf("device %s\nchecked %u elements of a*x+y: all equal to the CPU's\n", name, n);
    return 0;
}
