// com.cellsam.RelPosAttention as an ONNX Runtime custom op (CPU execution provider).
//
// Loaded with SessionOptions.register_custom_ops_library(path): ORT calls RegisterCustomOps,
// which adds the "com.cellsam" domain to those session options.
//   inputs  query, key, value [B, S, heads*D] float32 (query already scaled),
//           rel_h [B, S, heads, H], rel_w [B, S, heads, W] with S = H*W (row-major tokens)
//   output  [B, S, heads*D]
#include <cstdio>
#include <cstring>
#include <mutex>
#include <vector>

#include "ort_abi.h"
#include "relpos_attention.h"

namespace {

using namespace ort;

const Api* g_api = nullptr;
std::mutex g_domains_lock;
std::vector<CustomOpDomain*> g_domains;  // must outlive every session: kept for the process

constexpr size_t kInputs = 5;

struct Runner {
  const Api* api;
  KernelContext* context;
  Status* status;
};

void parallel_for(void* runner, void (*fn)(void*, size_t), size_t total, void* data) {
  auto& r = *static_cast<Runner*>(runner);
  if (r.status != nullptr) return;
  r.status = slot<KernelContextParallelFor>(r.api)(r.context, fn, total, 0, data);
}

Status* fail(const char* message) { return slot<CreateStatus>(g_api)(kInvalidArgument, message); }

// Shape of input `i` into dims; nullptr or an error status.
Status* input_shape(KernelContext* ctx, size_t i, const Value** value, std::vector<int64_t>& dims) {
  if (Status* s = slot<KernelContextGetInput>(g_api)(ctx, i, value)) return s;
  TensorTypeAndShapeInfo* info = nullptr;
  if (Status* s = slot<GetTensorTypeAndShape>(g_api)(*value, &info)) return s;
  size_t rank = 0;
  Status* s = slot<GetDimensionsCount>(g_api)(info, &rank);
  if (s == nullptr) {
    dims.assign(rank, 0);
    s = slot<GetDimensions>(g_api)(info, dims.data(), rank);
  }
  slot<ReleaseTensorTypeAndShapeInfo>(g_api)(info);
  return s;
}

Status* compute(void*, KernelContext* ctx) {
  const Value* in[kInputs];
  std::vector<int64_t> d[kInputs];
  for (size_t i = 0; i < kInputs; ++i)
    if (Status* s = input_shape(ctx, i, &in[i], d[i])) return s;
  if (d[0].size() != 3 || d[1] != d[0] || d[2] != d[0])
    return fail("RelPosAttention: query, key and value must be [B, S, heads*D] of one shape");
  if (d[3].size() != 4 || d[4].size() != 4)
    return fail("RelPosAttention: rel_h must be [B, S, heads, H] and rel_w [B, S, heads, W]");
  const int64_t batch = d[0][0], seq = d[0][1], channels = d[0][2], heads = d[3][2];
  if (d[3][0] != batch || d[3][1] != seq || d[4][0] != batch || d[4][1] != seq || d[4][2] != heads)
    return fail("RelPosAttention: rel_h/rel_w batch, tokens or heads differ from the query's");
  const int64_t height = d[3][3], width = d[4][3];
  if (height * width != seq)
    return fail("RelPosAttention: tokens S must equal H * W (rel_h's and rel_w's last dims)");
  if (heads <= 0 || channels % heads != 0)
    return fail("RelPosAttention: query channels are not a multiple of the heads");
  Value* out = nullptr;
  if (Status* s = slot<KernelContextGetOutput>(g_api)(ctx, 0, d[0].data(), 3, &out)) return s;
  float* ptr[kInputs + 1];
  for (size_t i = 0; i < kInputs; ++i)
    if (Status* s = slot<GetTensorMutableData>(g_api)(const_cast<Value*>(in[i]),
                                                      reinterpret_cast<void**>(&ptr[i])))
      return s;
  if (Status* s = slot<GetTensorMutableData>(g_api)(out, reinterpret_cast<void**>(&ptr[kInputs])))
    return s;
  cellsam::AttentionShape shape{batch, heads, channels / heads, height, width};
  Runner runner{g_api, ctx, nullptr};
  if (const char* error = cellsam::relpos_attention(shape, ptr[0], ptr[1], ptr[2], ptr[3], ptr[4],
                                                    ptr[5], parallel_for, &runner))
    return fail(error);
  return runner.status;
}

Status* create_kernel(const CustomOp*, const Api*, const KernelInfo*, void** kernel) {
  *kernel = nullptr;  // stateless
  return nullptr;
}

CustomOp make_op() {
  CustomOp op{};
  op.version = kApiVersion;
  op.GetName = [](const CustomOp*) { return "RelPosAttention"; };
  op.GetExecutionProviderType = [](const CustomOp*) -> const char* { return nullptr; };  // CPU
  op.GetInputType = [](const CustomOp*, size_t) { return kFloat; };
  op.GetInputTypeCount = [](const CustomOp*) { return kInputs; };
  op.GetOutputType = [](const CustomOp*, size_t) { return kFloat; };
  op.GetOutputTypeCount = [](const CustomOp*) -> size_t { return 1; };
  op.KernelDestroy = [](void*) {};
  op.GetInputCharacteristic = [](const CustomOp*, size_t) { return kRequired; };
  op.GetOutputCharacteristic = [](const CustomOp*, size_t) { return kRequired; };
  op.GetInputMemoryType = [](const CustomOp*, size_t) { return kMemTypeDefault; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  return op;
}

const CustomOp g_relpos_attention = make_op();

}  // namespace

extern "C" {

__attribute__((visibility("default"))) Status* RegisterCustomOps(SessionOptions* options,
                                                                 const ApiBase* base) {
  const Api* api = base->GetApi(kApiVersion);
  if (api == nullptr) {
    const Api* oldest = base->GetApi(1);
    return oldest ? slot<CreateStatus>(oldest)(kFail, "cellsam-rt kernels need onnxruntime >= 1.17")
                  : nullptr;
  }
  g_api = api;
  CustomOpDomain* domain = nullptr;
  if (Status* s = slot<CreateCustomOpDomain>(api)("com.cellsam", &domain)) return s;
  {
    std::lock_guard<std::mutex> lock(g_domains_lock);
    g_domains.push_back(domain);
  }
  if (Status* s = slot<CustomOpDomainAdd>(api)(domain, &g_relpos_attention)) return s;
  return slot<AddCustomOpDomain>(api)(options, domain);
}

// For cellsam_rt.kernels, before any session: does the ONNX Runtime loaded in this process serve
// the API version these declarations were written for, and do the slots that can be exercised
// without a session (status create / read / release) behave as declared? 0 = yes; otherwise
// `message` says what does not match.
__attribute__((visibility("default"))) int cellsam_kernels_abi_check(const ApiBase* base,
                                                                     uint32_t version,
                                                                     char* message, size_t n) {
  const Api* api = base->GetApi(version);
  if (api == nullptr) {
    std::snprintf(message, n, "onnxruntime %s does not serve C API version %u (cellsam-rt's "
                  "kernels need onnxruntime >= 1.%u)", base->GetVersionString(), version, version);
    return 1;
  }
  static const char kProbe[] = "cellsam-rt ABI probe";
  Status* status = slot<CreateStatus>(api)(kInvalidArgument, kProbe);
  const bool same = status != nullptr && slot<GetErrorCode>(api)(status) == kInvalidArgument &&
                    std::strcmp(slot<GetErrorMessage>(api)(status), kProbe) == 0;
  if (status != nullptr) slot<ReleaseStatus>(api)(status);
  if (!same) {
    std::snprintf(message, n, "onnxruntime %s: its C API table does not match the slots "
                  "cellsam-rt's kernels were built with (kernels/ort_abi.h)",
                  base->GetVersionString());
    return 2;
  }
  return 0;
}

// The C API version the library was written against (ort_abi.h's kApiVersion).
__attribute__((visibility("default"))) uint32_t cellsam_kernels_api_version() { return kApiVersion; }

// For cellsam_rt.kernels: the path this CPU runs, 0 portable, 1 AVX2 + FMA, 2 AVX-512.
__attribute__((visibility("default"))) int cellsam_kernels_isa() {
  return static_cast<int>(cellsam::best_isa());
}

}  // extern "C"
