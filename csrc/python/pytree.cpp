// The flattener's hot paths over Python objects (see pytree.hpp).
#include "python/pytree.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace tensorfile::python {
namespace {

class Writer {
 public:
  explicit Writer(int max_depth) : max_depth_(max_depth) {}

  void value(PyObject* o, int depth) {
    if (PyUnicode_CheckExact(o)) return string(o);
    if (o == Py_None || o == Py_True || o == Py_False) {
      out.append(o == Py_None ? "null" : (o == Py_True ? "true" : "false"));
      return;
    }
    if (PyLong_CheckExact(o)) return integer(o);
    if (PyList_CheckExact(o)) {
      enter(depth);
      out.push_back('[');
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(o); i++) {
        if (i) out.push_back(',');
        value(PyList_GET_ITEM(o, i), depth + 1);
      }
      out.push_back(']');
      return;
    }
    if (PyDict_CheckExact(o)) return dict(o, depth);
    if (PyFloat_CheckExact(o)) return real(o);
    throw py::type_error(std::string("Object of type ") + Py_TYPE(o)->tp_name + " is not JSON serializable");
  }

  std::string out;

 private:
  void enter(int depth) const {
    if (depth >= max_depth_) throw std::length_error("the object tree is nested too deeply to encode");
  }

  void dict(PyObject* o, int depth) {
    enter(depth);
    out.push_back('{');
    Py_ssize_t pos = 0;
    PyObject *k = nullptr, *v = nullptr;
    bool first = true;
    while (PyDict_Next(o, &pos, &k, &v)) {
      if (!PyUnicode_CheckExact(k)) throw py::type_error("only str dict keys are encoded");
      if (!first) out.push_back(',');
      first = false;
      string(k);
      out.push_back(':');
      value(v, depth + 1);
    }
    out.push_back('}');
  }

  // Printable ASCII without quote or backslash is copied as is; anything else goes through
  // json's own escaping, so the bytes stay json.dumps' exactly.
  void string(PyObject* o) {
    if (PyUnicode_IS_ASCII(o)) {
      const auto* s = static_cast<const char*>(PyUnicode_DATA(o));
      const Py_ssize_t n = PyUnicode_GET_LENGTH(o);
      bool plain = true;
      for (Py_ssize_t i = 0; i < n && plain; i++) {
        const char c = s[i];
        plain = c >= 0x20 && c < 0x7f && c != '"' && c != '\\';
      }
      if (plain) {
        out.push_back('"');
        out.append(s, static_cast<size_t>(n));
        out.push_back('"');
        return;
      }
    }
    if (!escape_) escape_ = py::module_::import("json.encoder").attr("encode_basestring_ascii");
    out += escape_(py::handle(o)).cast<std::string>();
  }

  void integer(PyObject* o) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow == 0 && !(v == -1 && PyErr_Occurred())) {
      out += std::to_string(v);
      return;
    }
    PyErr_Clear();
    out += py::str(py::handle(o)).cast<std::string>();
  }

  void real(PyObject* o) {
    if (!std::isfinite(PyFloat_AS_DOUBLE(o))) {
      throw py::value_error("Out of range float values are not JSON compliant");
    }
    out += py::repr(py::handle(o)).cast<std::string>();
  }

  int max_depth_;
  py::object escape_;
};

}  // namespace

py::object tensor_dict_items(const py::list& keys, const py::list& values, py::handle tensor_type,
                             py::handle param_type, Py_ssize_t first) {
  const Py_ssize_t n = PyList_GET_SIZE(values.ptr());
  if (PyList_GET_SIZE(keys.ptr()) != n) throw std::invalid_argument("tensor_dict_items: keys and values differ");
  std::vector<PyObject*> seen(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject* k = PyList_GET_ITEM(keys.ptr(), i);
    PyObject* v = PyList_GET_ITEM(values.ptr(), i);
    auto* type = reinterpret_cast<PyObject*>(Py_TYPE(v));
    if (!PyUnicode_CheckExact(k) || !PyUnicode_IS_ASCII(k) || (type != tensor_type.ptr() && type != param_type.ptr())) {
      return py::none();
    }
    seen[static_cast<size_t>(i)] = v;
  }
  std::sort(seen.begin(), seen.end());
  if (std::adjacent_find(seen.begin(), seen.end()) != seen.end()) return py::none();
  py::list items(2 * n);
  py::str tag("tensor");
  for (Py_ssize_t i = 0; i < n; i++) {
    PyObject* k = PyList_GET_ITEM(keys.ptr(), i);
    Py_INCREF(k);
    PyList_SET_ITEM(items.ptr(), 2 * i, k);
    py::list leaf(2);
    leaf[0] = tag;
    leaf[1] = py::int_(first + i);
    PyList_SET_ITEM(items.ptr(), 2 * i + 1, leaf.release().ptr());
  }
  return std::move(items);
}

std::string encode_tree_json(py::handle obj, int max_depth) {
  Writer w(max_depth);
  w.value(obj.ptr(), 0);
  return std::move(w.out);
}

}  // namespace tensorfile::python
