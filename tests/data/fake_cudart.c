/* A stand-in for libcudart with the functions tensorfile's shim binds, backed by host
   memory (device pointers are host pointers, copies are immediate). It lets the tests
   drive the real CUDA code path (dlopen, the function table, error names, per-thread
   current device) on machines without a GPU. Failures are injected with
   FAKE_CUDART_FAIL_COPY=n (the n-th copy fails asynchronously, as a device fault does)
   and FAKE_CUDART_FAIL_HOSTALLOC=1. */
#include <stdlib.h>
#include <string.h>

static __thread int current = 0;
static int sticky = 0;
static long copies = 0, live = 0;

static void up(void) { __atomic_add_fetch(&live, 1, __ATOMIC_SEQ_CST); }
static void down(void) { __atomic_sub_fetch(&live, 1, __ATOMIC_SEQ_CST); }
static long env(const char* name) {
  const char* v = getenv(name);
  return v ? atol(v) : 0;
}

int cudaGetDeviceCount(int* n) { *n = 2; return 0; }
int cudaSetDevice(int d) {
  if (d < 0 || d >= 2) return 101;
  current = d;
  return 0;
}
int cudaGetDevice(int* d) { *d = current; return 0; }
int cudaHostAlloc(void** p, size_t n, unsigned flags) {
  (void)flags;
  if (env("FAKE_CUDART_FAIL_HOSTALLOC")) return 2;
  *p = malloc(n ? n : 1);
  up();
  return 0;
}
int cudaFreeHost(void* p) { free(p); down(); return 0; }
int cudaStreamCreateWithFlags(void** s, unsigned flags) { (void)flags; *s = malloc(1); up(); return 0; }
int cudaStreamDestroy(void* s) { free(s); down(); return 0; }
int cudaStreamSynchronize(void* s) { (void)s; return __atomic_load_n(&sticky, __ATOMIC_SEQ_CST); }
int cudaMemcpyAsync(void* dst, const void* src, size_t n, int kind, void* s) {
  (void)s;
  if (kind != 1 && kind != 2) return 21; /* cudaErrorInvalidMemcpyDirection */
  long k = __atomic_add_fetch(&copies, 1, __ATOMIC_SEQ_CST);
  if (k == env("FAKE_CUDART_FAIL_COPY")) {
    __atomic_store_n(&sticky, 700, __ATOMIC_SEQ_CST);
    return 0;
  }
  memcpy(dst, src, n);
  return 0;
}
int cudaEventCreateWithFlags(void** e, unsigned flags) { (void)flags; *e = malloc(1); up(); return 0; }
int cudaEventRecord(void* e, void* s) { (void)e; (void)s; return 0; }
int cudaEventQuery(void* e) { (void)e; return __atomic_load_n(&sticky, __ATOMIC_SEQ_CST); }
int cudaEventSynchronize(void* e) { (void)e; return __atomic_load_n(&sticky, __ATOMIC_SEQ_CST); }
int cudaEventDestroy(void* e) { free(e); down(); return 0; }
const char* cudaGetErrorName(int code) {
  switch (code) {
    case 2: return "cudaErrorMemoryAllocation";
    case 21: return "cudaErrorInvalidMemcpyDirection";
    case 101: return "cudaErrorInvalidDevice";
    case 700: return "cudaErrorIllegalAddress";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(int code) { return code == 700 ? "an illegal memory access was encountered" : "error"; }

/* For the tests. */
int fake_current_device(void) { return current; }
long fake_live(void) { return __atomic_load_n(&live, __ATOMIC_SEQ_CST); }
long fake_copies(void) { return __atomic_load_n(&copies, __ATOMIC_SEQ_CST); }
