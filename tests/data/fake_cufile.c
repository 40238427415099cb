/* A stand-in for libcufile with the functions tensorfile's shim binds: "device" memory is
   host memory and cuFileRead/cuFileWrite are pread/pwrite, capped at 300,000 bytes per
   call so that callers must loop. FAKE_CUFILE_FAIL_READ=n makes the n-th read fail with
   CU_FILE_IO_NOT_SUPPORTED; FAKE_CUFILE_FAIL_REGISTER=1 refuses every file;
   FAKE_CUFILE_OPEN_ERROR=n makes cuFileDriverOpen return n (5033 is what a machine
   without nvidia-fs gets). Like the real library, cuFileDriverOpen writes its log to
   $CUFILE_LOGFILE_PATH, else to cufile.log in the working directory. Buffer
   registrations are counted; a transfer into a registered buffer counts as direct. */
#include <stdio.h>
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

static long live = 0, reads = 0, registered = 0, registrations = 0, direct = 0;
#define MAX_BUFS 1024
static const void* bufs[MAX_BUFS];
static const size_t kCap = 300000;

static long env(const char* name) {
  const char* v = getenv(name);
  return v ? atol(v) : 0;
}

CUfileError_t cuFileDriverOpen(void) {
  CUfileError_t e = {0, 0};
  const char* log = getenv("CUFILE_LOGFILE_PATH");
  FILE* f = fopen(log && *log ? log : "cufile.log", "a");
  if (f) {
    fputs("cuFileDriverOpen\n", f);
    fclose(f);
  }
  e.err = (int)env("FAKE_CUFILE_OPEN_ERROR");
  return e;
}
CUfileError_t cuFileHandleRegister(void** fh, CUfileDescr_t* d) {
  CUfileError_t e = {0, 0};
  if (d->type != 1 || d->fs_ops != 0 || env("FAKE_CUFILE_FAIL_REGISTER")) {
    e.err = 5018; /* CU_FILE_INVALID_FILE_TYPE */
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
static int find_buf(const void* p) {
  for (int i = 0; i < MAX_BUFS; i++) {
    if (bufs[i] == p) return i;
  }
  return -1;
}
CUfileError_t cuFileBufRegister(const void* p, size_t n, int flags) {
  (void)n, (void)flags;
  CUfileError_t e = {0, 0};
  if (find_buf(p) >= 0) {
    e.err = 5023; /* CU_FILE_MEMORY_ALREADY_REGISTERED */
    return e;
  }
  int slot = find_buf(0);
  if (slot < 0) {
    e.err = 5036; /* CU_FILE_GPU_MEMORY_PINNING_FAILED */
    return e;
  }
  bufs[slot] = p;
  registered++;
  registrations++;
  return e;
}
CUfileError_t cuFileBufDeregister(const void* p) {
  CUfileError_t e = {0, 0};
  int slot = find_buf(p);
  if (slot < 0) {
    e.err = 5024; /* CU_FILE_MEMORY_NOT_REGISTERED */
    return e;
  }
  bufs[slot] = 0;
  registered--;
  return e;
}
ssize_t cuFileRead(void* fh, void* base, size_t n, off_t off, off_t dev_off) {
  long k = __atomic_add_fetch(&reads, 1, __ATOMIC_SEQ_CST);
  if (k == env("FAKE_CUFILE_FAIL_READ")) return -5008;
  if (find_buf(base) >= 0) __atomic_add_fetch(&direct, 1, __ATOMIC_SEQ_CST);
  return pread(*(int*)fh, (char*)base + dev_off, n < kCap ? n : kCap, off);
}
ssize_t cuFileWrite(void* fh, const void* base, size_t n, off_t off, off_t dev_off) {
  if (find_buf(base) >= 0) __atomic_add_fetch(&direct, 1, __ATOMIC_SEQ_CST);
  return pwrite(*(int*)fh, (const char*)base + dev_off, n < kCap ? n : kCap, off);
}

long fake_cufile_live(void) { return __atomic_load_n(&live, __ATOMIC_SEQ_CST); }
long fake_cufile_reads(void) { return __atomic_load_n(&reads, __ATOMIC_SEQ_CST); }
/* Buffers registered now, registrations ever, transfers into registered buffers. */
long fake_cufile_registered(void) { return registered; }
long fake_cufile_registrations(void) { return registrations; }
long fake_cufile_direct(void) { return __atomic_load_n(&direct, __ATOMIC_SEQ_CST); }
