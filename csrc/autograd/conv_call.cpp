// Direct Python entry points into bigkernels::conv and bigkernels::conv_depthwise (with their
// autograd, csrc/autograd/conv.cpp): bigkernels._C._conv(...) and bigkernels._C._conv_depthwise(...).
//
// Why: calling an op as torch.ops.bigkernels.conv.default(...) converts every argument into a boxed
// IValue stack and calls the kernel boxed; that path cost ~6 us more per call than torch's own
// conv2d binding (the 2-core Xeon, fp32, SmallCNN's three 3x3 convs at batch 8: 218 vs 200 us for
// the chain through torch.ops.aten.convolution vs F.conv2d), a visible share of a small layer.
// These entries parse the arguments with torch's own argument parser (the one behind F.conv2d) and
// call the op's typed handle through the dispatcher, so autograd, profiling, dispatch modes and
// every backend still apply. bigkernels/ops/conv.py uses them on its eager fast path only; traced
// code (torch.compile) and any tensor with __torch_function__ take torch.ops as before: these
// return None for the latter so the caller can.
//
// Registered by PyInit__C (csrc/ops.cpp) through conv_python_methods below.
// torch/csrc/Exceptions.h formats messages with fmt, which libtorch does not export: compile
// the few fmt functions it needs into this file.
#ifndef FMT_HEADER_ONLY
#define FMT_HEADER_ONLY 1
#endif
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/csrc/utils/python_arg_parser.h>

#include <string>
#include <tuple>

namespace bigkernels::python {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using ConvSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                           c10::string_view, double, bool);
using ConvDepthwiseSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                    const OptTensor&, at::IntArrayRef, at::IntArrayRef,
                                                    at::IntArrayRef, c10::string_view, double, bool);

// _conv(input, weight, bias, residual, stride, padding, dilation, groups, activation, negative_slope,
//       need_preactivation) -> output (the preactivation is not returned: the callers drop it).
PyObject* conv_call(PyObject* /*module*/, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  static torch::PythonArgParser parser({
      "_conv(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, IntArrayRef[2] stride, "
      "IntArrayRef[2] padding, IntArrayRef[2] dilation, int64_t groups, std::string activation, "
      "double negative_slope, bool need_preactivation)",
  });
  torch::ParsedArgs<11> parsed;
  auto r = parser.parse(args, kwargs, parsed);
  if (r.has_torch_function()) Py_RETURN_NONE;  // the caller takes torch.ops, which honours it
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bigkernels::conv", "").typed<ConvSig>();
  // Every argument is read from its Python object before the GIL is released.
  const Tensor input = r.tensor(0), weight = r.tensor(1);
  const OptTensor bias = r.optionalTensor(2), residual = r.optionalTensor(3);
  const std::vector<int64_t> stride = r.intlist(4), padding = r.intlist(5), dilation = r.intlist(6);
  const int64_t groups = r.toInt64(7);
  const std::string activation = r.string(8);
  const double negative_slope = r.toDouble(9);
  const bool need_preactivation = r.toBool(10);
  Tensor output;
  {
    pybind11::gil_scoped_release no_gil;
    output = std::get<0>(op.call(input, weight, bias, residual, stride, padding, dilation, groups, activation,
                                 negative_slope, need_preactivation));
  }
  return THPVariable_Wrap(std::move(output));
  END_HANDLE_TH_ERRORS
}

// _conv_depthwise(input, weight, bias, residual, stride, padding, dilation, activation,
//                 negative_slope, need_preactivation) -> output
PyObject* conv_depthwise_call(PyObject* /*module*/, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  static torch::PythonArgParser parser({
      "_conv_depthwise(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, IntArrayRef[2] stride, "
      "IntArrayRef[2] padding, IntArrayRef[2] dilation, std::string activation, double negative_slope, "
      "bool need_preactivation)",
  });
  torch::ParsedArgs<10> parsed;
  auto r = parser.parse(args, kwargs, parsed);
  if (r.has_torch_function()) Py_RETURN_NONE;
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bigkernels::conv_depthwise", "").typed<ConvDepthwiseSig>();
  const Tensor input = r.tensor(0), weight = r.tensor(1);
  const OptTensor bias = r.optionalTensor(2), residual = r.optionalTensor(3);
  const std::vector<int64_t> stride = r.intlist(4), padding = r.intlist(5), dilation = r.intlist(6);
  const std::string activation = r.string(7);
  const double negative_slope = r.toDouble(8);
  const bool need_preactivation = r.toBool(9);
  Tensor output;
  {
    pybind11::gil_scoped_release no_gil;
    output = std::get<0>(op.call(input, weight, bias, residual, stride, padding, dilation, activation,
                                 negative_slope, need_preactivation));
  }
  return THPVariable_Wrap(std::move(output));
  END_HANDLE_TH_ERRORS
}

}  // namespace

// NOLINTNEXTLINE(cppcoreguidelines-avoid-c-arrays)
PyMethodDef conv_python_methods[] = {
    {"_conv", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(conv_call)), METH_VARARGS | METH_KEYWORDS,
     "bigkernels::conv with autograd, called directly (bigkernels/ops/conv.py's eager fast path)."},
    {"_conv_depthwise", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(conv_depthwise_call)),
     METH_VARARGS | METH_KEYWORDS,
     "bigkernels::conv_depthwise with autograd, called directly (bigkernels/ops/conv.py's eager fast path)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace bigkernels::python
