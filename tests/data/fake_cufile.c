/* A stand-in for libcufile with the functions tensorfile's shim binds: "device" memory is
   host memory and cuFileRead/cuFileWrite are pread/pwrite, capped at 300,000 bytes per
   call so that callers must loop. FAKE_CUFILE_FAIL_READ=n makes the n-th read fail with
   CU_FILE_IO_NOT_SUPPORTED; FAKE_CUFILE_FAIL_REGISTER=1 refuses every file. */
#include <stdlib.h>
#include <sys/types.h>
#include <unistd.h>

typedef struct {
  int err;
  int cu_err;
} CUfileError_t;
typedef struct {
  int type;
  union {
    int fd;
    void* handle;
  } handle;
  const void* fs_ops;
} CUfileDescr_t;

static long live = 0, reads = 0;
static const size_t kCap = 300000;

static long env(const char* name) {
  const char* v = getenv(name);
  return v ? atol(v) : 0;
}

CUfileError_t cuFileDriverOpen(void) {
  CUfileError_t e = {0, 0};
  return e;
}
CUfileError_t cuFileHandleRegister(void** fh, CUfileDescr_t* d) {
  CUfileError_t e = {0, 0};
  if (d->type != 1 || d->fs_ops != 0 || env("FAKE_CUFILE_FAIL_REGISTER")) {
    e.err = 5030; /* CU_FILE_INVALID_FILE_TYPE */
    return e;
  }
  int* h = malloc(sizeof(int));
  *h = d->handle.fd;
  *fh = h;
  __atomic_add_fetch(&live, 1, __ATOMIC_SEQ_CST);
  return e;
}
void cuFileHandleDeregister(void* fh) {
  free(fh);
  __atomic_sub_fetch(&live, 1, __ATOMIC_SEQ_CST);
}
CUfileError_t cuFileBufRegister(const void* p, size_t n, int flags) {
  (void)p, (void)n, (void)flags;
  CUfileError_t e = {0, 0};
  return e;
}
CUfileError_t cuFileBufDeregister(const void* p) {
  (void)p;
  CUfileError_t e = {0, 0};
  return e;
}
ssize_t cuFileRead(void* fh, void* base, size_t n, off_t off, off_t dev_off) {
  long k = __atomic_add_fetch(&reads, 1, __ATOMIC_SEQ_CST);
  if (k == env("FAKE_CUFILE_FAIL_READ")) return -5008;
  return pread(*(int*)fh, (char*)base + dev_off, n < kCap ? n : kCap, off);
}
ssize_t cuFileWrite(void* fh, const void* base, size_t n, off_t off, off_t dev_off) {
  return pwrite(*(int*)fh, (const char*)base + dev_off, n < kCap ? n : kCap, off);
}

long fake_cufile_live(void) { return __atomic_load_n(&live, __ATOMIC_SEQ_CST); }
long fake_cufile_reads(void) { return __atomic_load_n(&reads, __ATOMIC_SEQ_CST); }
