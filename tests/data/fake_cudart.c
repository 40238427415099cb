/* A stand-in for libcudart with the functions tensorfile's shim binds, backed by host
   memory (device pointers are host pointers, copies are immediate). It lets the tests
   drive the real CUDA code path (dlopen, the function table, error names) on machines
   without a GPU, and models what the real runtime does that costs a user:
   - a per-thread current device (0 until cudaSetDevice) and one primary context per
     device, created by cudaSetDevice or by the first call that needs one on the
     current device (allocations, streams, events, copies), as CUDA 12 and later do;
     fake_contexts_created(d) counts them;
   - the driver's cuDeviceGet and cuDevicePrimaryCtxGetState (which create nothing);
   - event flags: a cudaEventSynchronize on an event created without
     cudaEventBlockingSync spins, as does every cudaStreamSynchronize (fake_spins);
   - pinned (cudaHostAlloc) vs pageable host memory: a copy whose host side is not
     pinned counts in fake_pageable_copies.
   Two devices. Failures are injected with FAKE_CUDART_FAIL_COPY=n (the n-th copy fails
   asynchronously, as a device fault does) and FAKE_CUDART_FAIL_HOSTALLOC=1. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define NDEV 2
#define MAX_PINNED 4096

static __thread int current = 0;
static int sticky = 0;
static long copies = 0, live = 0, spins = 0, pageable = 0;
static int context_active[NDEV];
static long contexts_created[NDEV];
static pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
static struct {
  char* p;
  size_t n;
} pinned[MAX_PINNED];

typedef struct {
  unsigned flags;
} Event;

static void up(void) { __atomic_add_fetch(&live, 1, __ATOMIC_SEQ_CST); }
static void down(void) { __atomic_sub_fetch(&live, 1, __ATOMIC_SEQ_CST); }
static long env(const char* name) {
  const char* v = getenv(name);
  return v ? atol(v) : 0;
}
static void activate(int d) {
  pthread_mutex_lock(&mutex);
  if (!context_active[d]) {
    context_active[d] = 1;
    contexts_created[d]++;
  }
  pthread_mutex_unlock(&mutex);
}
/* What every call that needs a context does first: the current device's. */
static void need_context(void) { activate(current); }
static int is_pinned(const void* p, size_t n) {
  const char* c = (const char*)p;
  int found = 0;
  pthread_mutex_lock(&mutex);
  for (int i = 0; i < MAX_PINNED && !found; i++) {
    found = pinned[i].p && c >= pinned[i].p && c + n <= pinned[i].p + pinned[i].n;
  }
  pthread_mutex_unlock(&mutex);
  return found;
}

int cudaGetDeviceCount(int* n) { *n = NDEV; return 0; }
int cudaSetDevice(int d) {
  if (d < 0 || d >= NDEV) return 101;
  current = d;
  activate(d);
  return 0;
}
int cudaGetDevice(int* d) { *d = current; return 0; }
int cudaHostAlloc(void** p, size_t n, unsigned flags) {
  (void)flags;
  need_context();
  if (env("FAKE_CUDART_FAIL_HOSTALLOC")) return 2;
  *p = malloc(n ? n : 1);
  pthread_mutex_lock(&mutex);
  for (int i = 0; i < MAX_PINNED; i++) {
    if (!pinned[i].p) {
      pinned[i].p = *p;
      pinned[i].n = n;
      break;
    }
  }
  pthread_mutex_unlock(&mutex);
  up();
  return 0;
}
int cudaFreeHost(void* p) {
  pthread_mutex_lock(&mutex);
  for (int i = 0; i < MAX_PINNED; i++) {
    if (pinned[i].p == p) pinned[i].p = 0;
  }
  pthread_mutex_unlock(&mutex);
  free(p);
  down();
  return 0;
}
int cudaStreamCreateWithFlags(void** s, unsigned flags) {
  (void)flags;
  need_context();
  *s = malloc(1);
  up();
  return 0;
}
int cudaStreamDestroy(void* s) { free(s); down(); return 0; }
int cudaStreamSynchronize(void* s) {
  (void)s;
  __atomic_add_fetch(&spins, 1, __ATOMIC_SEQ_CST);
  return __atomic_load_n(&sticky, __ATOMIC_SEQ_CST);
}
int cudaMemcpyAsync(void* dst, const void* src, size_t n, int kind, void* s) {
  (void)s;
  need_context();
  if (kind != 1 && kind != 2) return 21; /* cudaErrorInvalidMemcpyDirection */
  if (!is_pinned(kind == 1 ? src : dst, n)) __atomic_add_fetch(&pageable, 1, __ATOMIC_SEQ_CST);
  long k = __atomic_add_fetch(&copies, 1, __ATOMIC_SEQ_CST);
  if (k == env("FAKE_CUDART_FAIL_COPY")) {
    __atomic_store_n(&sticky, 700, __ATOMIC_SEQ_CST);
    return 0;
  }
  memcpy(dst, src, n);
  return 0;
}
int cudaEventCreateWithFlags(void** e, unsigned flags) {
  need_context();
  Event* ev = malloc(sizeof(Event));
  ev->flags = flags;
  *e = ev;
  up();
  return 0;
}
int cudaEventRecord(void* e, void* s) { (void)e; (void)s; need_context(); return 0; }
int cudaEventQuery(void* e) { (void)e; return __atomic_load_n(&sticky, __ATOMIC_SEQ_CST); }
int cudaEventSynchronize(void* e) {
  if (!(((Event*)e)->flags & 1)) __atomic_add_fetch(&spins, 1, __ATOMIC_SEQ_CST); /* cudaEventBlockingSync */
  return __atomic_load_n(&sticky, __ATOMIC_SEQ_CST);
}
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

/* The driver API's view, which libcuda gives a real process. */
int cuDeviceGet(int* dev, int ordinal) {
  if (ordinal < 0 || ordinal >= NDEV) return 101; /* CUDA_ERROR_INVALID_DEVICE */
  *dev = ordinal;
  return 0;
}
int cuDevicePrimaryCtxGetState(int dev, unsigned* flags, int* active) {
  if (dev < 0 || dev >= NDEV) return 101;
  *flags = 0;
  pthread_mutex_lock(&mutex);
  *active = context_active[dev];
  pthread_mutex_unlock(&mutex);
  return 0;
}

/* For the tests. */
int fake_current_device(void) { return current; }
long fake_live(void) { return __atomic_load_n(&live, __ATOMIC_SEQ_CST); }
long fake_copies(void) { return __atomic_load_n(&copies, __ATOMIC_SEQ_CST); }
long fake_contexts_created(int d) {
  pthread_mutex_lock(&mutex);
  long n = contexts_created[d];
  pthread_mutex_unlock(&mutex);
  return n;
}
long fake_spins(void) { return __atomic_load_n(&spins, __ATOMIC_SEQ_CST); }
long fake_pageable_copies(void) { return __atomic_load_n(&pageable, __ATOMIC_SEQ_CST); }
