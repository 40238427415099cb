// The flattener's hot paths over Python objects (tensorfile/_tree.py): the nodes of a dict
// of tensors, and the object tree of a header (docs/format.md) as compact JSON, byte for
// byte what json.dumps(separators=(",", ":"), ensure_ascii=True, allow_nan=False) writes.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

namespace tensorfile::python {

// Encodes lists, dicts with str keys, str, int, bool, None and finite floats. Throws
// pybind11::type_error for any other object and pybind11::value_error for a non-finite
// float, as json.dumps raises TypeError and ValueError, and std::length_error past `max_depth`
// nested containers.
std::string encode_tree_json(pybind11::handle obj, int max_depth);

// The tree items of a dict whose keys are `keys` and values `values`, when it is the common
// state dict: ASCII str keys, values of exactly `tensor_type` or `param_type`, no value
// twice. Returns [key0, ["tensor", first], key1, ["tensor", first + 1], ...], or None
// (having built nothing) for any other dict.
pybind11::object tensor_dict_items(const pybind11::list& keys, const pybind11::list& values,
                                   pybind11::handle tensor_type, pybind11::handle param_type, Py_ssize_t first);

}  // namespace tensorfile::python
