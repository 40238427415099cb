// The planner's list walk (see plan_lists.hpp).
#include "python/plan_lists.hpp"

#include <stdexcept>

#include "plan.hpp"
#include "python/convert.hpp"

namespace py = pybind11;

namespace tensorfile::python {

namespace {

// An int from a list the planner gathered from torch; false when it is not one that fits.
bool int_item(PyObject* o, int64_t* out) {
  int overflow = 0;
  *out = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow != 0 || (*out == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  return true;
}

}  // namespace

py::object plan_tensors(const py::list& sizes, const py::list& strides, const py::list& data_ptrs,
                        const py::list& storage_offsets, const py::list& requires_grad, const py::list& dtypes,
                        const py::dict& dtype_codes, const std::vector<int64_t>& itemsizes, const py::list& types,
                        const py::handle& flagged_type, int64_t type_flag, int64_t grad_flag,
                        const py::function& storage_ptr, int64_t align) {
  const auto n = static_cast<size_t>(PyList_GET_SIZE(sizes.ptr()));
  for (const auto* l : {&strides, &data_ptrs, &storage_offsets, &requires_grad, &dtypes, &types}) {
    if (static_cast<size_t>(PyList_GET_SIZE(l->ptr())) != n)
      throw std::invalid_argument("plan_tensors: list lengths differ");
  }
  TensorSpans t;
  t.ndim.resize(n);
  t.first.resize(n);
  t.end.resize(n);
  t.storage.resize(n);
  t.shapes.reserve(n);  // one dim each, the common case; more grow the vectors
  t.strides.reserve(n);
  std::vector<int32_t> dtype(n);
  std::vector<int64_t> flags(n), dim_begin(n);
  std::vector<size_t> empties;
  for (size_t i = 0; i < n; i++) {
    PyObject* size = PyList_GET_ITEM(sizes.ptr(), i);
    PyObject* stride = PyList_GET_ITEM(strides.ptr(), i);
    if (!PyTuple_Check(size) || !PyTuple_Check(stride) || PyTuple_GET_SIZE(size) != PyTuple_GET_SIZE(stride)) {
      return py::none();
    }
    const Py_ssize_t ndim = PyTuple_GET_SIZE(size);
    dim_begin[i] = static_cast<int64_t>(t.shapes.size());
    t.ndim[i] = ndim;
    for (Py_ssize_t k = 0; k < ndim; k++) {
      int64_t d = 0, s = 0;
      if (!int_item(PyTuple_GET_ITEM(size, k), &d) || !int_item(PyTuple_GET_ITEM(stride, k), &s) || d < 0 || s < 0) {
        return py::none();
      }
      t.shapes.push_back(d);
      t.strides.push_back(s);
    }
    PyObject* code = PyDict_GetItemWithError(dtype_codes.ptr(), PyList_GET_ITEM(dtypes.ptr(), i));
    int64_t c = 0, offset = 0;
    if (code == nullptr || !int_item(code, &c) || c < 0 || static_cast<size_t>(c) >= itemsizes.size() ||
        !int_item(PyList_GET_ITEM(storage_offsets.ptr(), i), &offset) || offset < 0) {
      PyErr_Clear();
      return py::none();
    }
    dtype[i] = static_cast<int32_t>(c);
    const int64_t itemsize = itemsizes[static_cast<size_t>(c)];
    bool empty = false;
    if (__builtin_mul_overflow(offset, itemsize, &t.first[i]) ||
        !tensor_end(t.first[i], itemsize, t.shapes.data() + dim_begin[i], t.strides.data() + dim_begin[i], ndim,
                    &t.end[i], &empty)) {
      return py::none();
    }
    const unsigned long long ptr = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(data_ptrs.ptr(), i));
    if (ptr == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      PyErr_Clear();
      return py::none();
    }
    // A tensor's data pointer is its storage's plus its byte offset, which spares creating
    // a storage object per tensor; only an empty tensor's may be null.
    t.storage[i] = static_cast<uint64_t>(ptr) - static_cast<uint64_t>(t.first[i]);
    if (empty) empties.push_back(i);
    flags[i] = (PyList_GET_ITEM(requires_grad.ptr(), i) == Py_True ? grad_flag : 0) |
               (PyList_GET_ITEM(types.ptr(), i) == flagged_type.ptr() ? type_flag : 0);
  }
  for (size_t i : empties) t.storage[i] = storage_ptr(i).cast<uint64_t>();
  const StorageGroups g = group_storages(t, align);
  return py::make_tuple(to_array(dtype), to_array(dim_begin), to_array(t.ndim), to_array(t.shapes), to_array(t.strides),
                        to_array(g.offset), to_array(flags), to_array(g.storage), to_array(g.lead), to_array(g.ptrs),
                        to_array(g.nbytes));
}

}  // namespace tensorfile::python
