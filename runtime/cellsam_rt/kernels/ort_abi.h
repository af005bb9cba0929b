// The slice of ONNX Runtime's C ABI that our custom-op library uses.
//
// The onnxruntime wheels ship no C headers, so the library declares what it calls itself. ORT's
// API is a table of function pointers (OrtApi) that only ever grows at its end, each release
// keeping every earlier slot where it was (ORT asserts the offsets in its own build), and a
// custom op is a struct of callbacks (OrtCustomOp) read up to the version the op declares.
// Slot numbers below are those of the public onnxruntime_c_api.h; kApiVersion 17 (onnxruntime
// 1.17) is the first with KernelContext_ParallelFor, which runs our work on ORT's own threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ort {

struct Status;  // OrtStatus: nullptr means success
struct Api;     // OrtApi: used only through slot()
struct ApiBase {
  const Api* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};
struct SessionOptions;
struct CustomOpDomain;
struct KernelInfo;
struct KernelContext;
struct Value;
struct TensorTypeAndShapeInfo;

constexpr uint32_t kApiVersion = 17;

enum ElementType : int { kUndefined = 0, kFloat = 1 };
enum Characteristic : int { kRequired = 0 };
enum ErrorCode : int { kFail = 1, kInvalidArgument = 2 };
enum MemType : int { kMemTypeDefault = 0 };

// OrtApi slots and the signatures found there.
template <size_t Slot, typename Fn>
struct Entry {
  static constexpr size_t slot = Slot;
  using type = Fn;
};
using CreateStatus = Entry<0, Status* (*)(ErrorCode, const char*)>;
using GetErrorCode = Entry<1, ErrorCode (*)(const Status*)>;
using GetErrorMessage = Entry<2, const char* (*)(const Status*)>;
using ReleaseStatus = Entry<93, void (*)(Status*)>;
using CreateCustomOpDomain = Entry<26, Status* (*)(const char*, CustomOpDomain**)>;
using CustomOpDomainAdd = Entry<27, Status* (*)(CustomOpDomain*, const void* /*CustomOp*/)>;
using AddCustomOpDomain = Entry<28, Status* (*)(SessionOptions*, CustomOpDomain*)>;
using GetTensorMutableData = Entry<51, Status* (*)(Value*, void**)>;
using GetDimensionsCount = Entry<61, Status* (*)(const TensorTypeAndShapeInfo*, size_t*)>;
using GetDimensions = Entry<62, Status* (*)(const TensorTypeAndShapeInfo*, int64_t*, size_t)>;
using GetTensorTypeAndShape = Entry<65, Status* (*)(const Value*, TensorTypeAndShapeInfo**)>;
using KernelContextGetInputCount = Entry<88, Status* (*)(const KernelContext*, size_t*)>;
using KernelContextGetInput = Entry<90, Status* (*)(const KernelContext*, size_t, const Value**)>;
using KernelContextGetOutput =
    Entry<91, Status* (*)(KernelContext*, size_t, const int64_t*, size_t, Value**)>;
using ReleaseTensorTypeAndShapeInfo = Entry<99, void (*)(TensorTypeAndShapeInfo*)>;
using KernelContextParallelFor = Entry<274, Status* (*)(const KernelContext*,
                                                        void (*)(void*, size_t), size_t, size_t,
                                                        void*)>;

template <typename E>
typename E::type slot(const Api* api) {
  return reinterpret_cast<typename E::type>(reinterpret_cast<void* const*>(api)[E::slot]);
}

// OrtCustomOp, x86-64/aarch64 layout (a uint32 version, then pointer-sized callbacks). Fields
// after GetEndVersion exist in newer ORTs; with version 17 they are never read.
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp*, const Api*, const KernelInfo*);
  const char* (*GetName)(const CustomOp*);
  const char* (*GetExecutionProviderType)(const CustomOp*);
  ElementType (*GetInputType)(const CustomOp*, size_t);
  size_t (*GetInputTypeCount)(const CustomOp*);
  ElementType (*GetOutputType)(const CustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const CustomOp*);
  void (*KernelCompute)(void*, KernelContext*);
  void (*KernelDestroy)(void*);
  Characteristic (*GetInputCharacteristic)(const CustomOp*, size_t);
  Characteristic (*GetOutputCharacteristic)(const CustomOp*, size_t);
  MemType (*GetInputMemoryType)(const CustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const CustomOp*);
  int (*GetVariadicInputHomogeneity)(const CustomOp*);
  int (*GetVariadicOutputMinArity)(const CustomOp*);
  int (*GetVariadicOutputHomogeneity)(const CustomOp*);
  Status* (*CreateKernelV2)(const CustomOp*, const Api*, const KernelInfo*, void**);
  Status* (*KernelComputeV2)(void*, KernelContext*);
  void* InferOutputShapeFn;
  int (*GetStartVersion)(const CustomOp*);
  int (*GetEndVersion)(const CustomOp*);
  void* reserved[4];  // GetMayInplace .. ReleaseAliasMap
};

}  // namespace ort
