// The few libtorch calls that tch does not expose, behind a C ABI:
//  - tensors over caller-owned memory whose release callback runs when the last view is gone;
//  - loading a TorchScript archive whose tensor storages come from caller memory (the shared
//    mapping) instead of being read from the archive: libtorch's deserializer, minus the copy.
// Every function catches C++ exceptions and reports them through `error` (free with kzc_free).
#include <torch/script.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/csrc/jit/serialization/import_read.h>
#include <torch/csrc/jit/serialization/import_source.h>
#include <torch/csrc/jit/serialization/storage_context.h>
#include <torch/csrc/jit/operator_upgraders/upgraders_entry.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <caffe2/serialize/inline_container.h>
#include <ATen/DLConvertor.h>

#include <cstring>
#include <string>
#include <unordered_set>
#include <vector>

extern "C" {

typedef void (*kzc_release_fn)(void*);

typedef struct {
  const char* key;
  void* data;
  size_t nbytes;
  void* ctx;  // released through `release` when libtorch drops the storage
} kzc_storage;

typedef void (*kzc_named_tensor_fn)(void* user, const char* name, int is_buffer, torch::Tensor* t);

static char* kzc_strdup(const std::string& s) {
  char* out = static_cast<char*>(malloc(s.size() + 1));
  memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

#define KZC_TRY(error, fallback, ...)       \
  try {                                     \
    __VA_ARGS__                             \
  } catch (const std::exception& e) {       \
    *(error) = kzc_strdup(e.what());        \
    return fallback;                        \
  }

void kzc_free(char* p) { free(p); }

// DLPack, the standard way to hand a tensor to another framework without a copy: here, to the
// Python interpreter embedded in the same process, whose torch runs on this same libtorch.
// The DLManagedTensor owns a reference to `t`'s storage until its deleter runs.
void* kzc_to_dlpack(const torch::Tensor* t, char** error) {
  KZC_TRY(error, nullptr, { return static_cast<void*>(at::toDLPack(*t)); })
}

// Releases a DLManagedTensor that no tensor took (the consumer never used it).
void kzc_dlpack_delete(void* managed) {
  auto m = static_cast<DLManagedTensor*>(managed);
  if (m->deleter) m->deleter(m);
}

// Takes ownership of a DLManagedTensor: the tensor keeps it, and calls its deleter when the
// tensor's storage goes.
torch::Tensor* kzc_from_dlpack(void* managed, char** error) {
  KZC_TRY(error, nullptr, {
    return new torch::Tensor(at::fromDLPack(static_cast<DLManagedTensor*>(managed)));
  })
}

torch::Tensor* kzc_tensor_from_memory(void* data, const int64_t* sizes, int ndim, int scalar_type,
                                      void* ctx, kzc_release_fn release, char** error) {
  KZC_TRY(error, nullptr, {
    auto options = torch::TensorOptions().dtype(static_cast<at::ScalarType>(scalar_type)).device(torch::kCPU);
    auto t = torch::from_blob(data, at::IntArrayRef(sizes, ndim), [ctx, release](void*) { release(ctx); }, options);
    return new torch::Tensor(std::move(t));
  })
}

// Moves `n` owned storage pointers, from `first`, into a context under their keys.
static std::shared_ptr<torch::jit::DeserializationStorageContext> storage_context(
    const kzc_storage* storages, std::vector<c10::DataPtr>::iterator first, size_t n) {
  auto context = std::make_shared<torch::jit::DeserializationStorageContext>();
  for (size_t i = 0; i < n; i++) {
    const kzc_storage& s = storages[i];
    if (context->hasStorage(s.key)) throw std::runtime_error(std::string("storage key ") + s.key + " is given twice");
    auto nbytes = s.nbytes;
    context->addStorage(s.key, c10::Storage(c10::Storage::use_byte_size_t(), nbytes, std::move(*(first + i)),
                                            /*allocator=*/nullptr, /*resizable=*/false));
  }
  return context;
}

torch::jit::Module* kzc_jit_load(const char* skeleton_path, const kzc_storage* data, size_t n_data,
                                 const kzc_storage* constants, size_t n_constants, kzc_release_fn release,
                                 char** error) {
  // Each storage's context is released exactly once, whatever fails: first every one is owned
  // by a DataPtr (which cannot throw once the vector has room), then DataPtrs only move, and
  // whichever holds one when an error unwinds (the vector, a half-built context) releases it.
  std::vector<c10::DataPtr> owned;
  try {
    owned.reserve(n_data + n_constants);
  } catch (const std::exception& e) {
    for (size_t i = 0; i < n_data; i++) release(data[i].ctx);
    for (size_t i = 0; i < n_constants; i++) release(constants[i].ctx);
    *error = kzc_strdup(e.what());
    return nullptr;
  }
  for (size_t i = 0; i < n_data; i++) owned.emplace_back(data[i].data, data[i].ctx, release, c10::Device(c10::kCPU));
  for (size_t i = 0; i < n_constants; i++)
    owned.emplace_back(constants[i].data, constants[i].ctx, release, c10::Device(c10::kCPU));
  try {
    auto data_context = storage_context(data, owned.begin(), n_data);
    auto constants_context = storage_context(constants, owned.begin() + n_data, n_constants);
    torch::jit::populate_upgraders_graph_map();
    auto reader = std::make_shared<caffe2::serialize::PyTorchStreamReader>(std::string(skeleton_path));
    auto cu = std::make_shared<torch::jit::CompilationUnit>();
    std::vector<c10::IValue> constants_table;
    torch::jit::SourceImporter importer(
        cu, &constants_table,
        [&reader](const std::string& qualifier) -> std::shared_ptr<torch::jit::Source> {
          std::string path = "code/" + qualifier;
          std::replace(path.begin() + 5, path.end(), '.', '/');
          path += ".py";
          if (!reader->hasRecord(path)) return nullptr;
          auto [bytes, size] = reader->getRecord(path);
          return std::make_shared<torch::jit::Source>(
              std::string_view(static_cast<const char*>(bytes.get()), size), path, 1, nullptr,
              torch::jit::Source::COPIES_STRING);
        },
        reader->version());
    auto resolve = [&](const c10::QualifiedName& name) {
      return c10::StrongTypePtr(cu, importer.loadType(name));
    };
    auto constants_tuple = torch::jit::readArchiveAndTensors(
                               "constants", "", "", resolve, torch::jit::ObjLoaderFunc, std::nullopt, *reader,
                               torch::jit::Unpickler::defaultTypeParser, constants_context)
                               .toTuple();
    for (const auto& constant : constants_tuple->elements()) constants_table.push_back(constant);
    auto root = torch::jit::readArchiveAndTensors("data", "", "", resolve, torch::jit::ObjLoaderFunc, std::nullopt,
                                                  *reader, torch::jit::Unpickler::defaultTypeParser, data_context);
    auto module = new torch::jit::Module(root.toObject());
    module->eval();
    return module;
  } catch (const std::exception& e) {
    *error = kzc_strdup(e.what());
    return nullptr;
  }
}

void kzc_jit_free(torch::jit::Module* m) { delete m; }

torch::Tensor* kzc_jit_forward(torch::jit::Module* m, torch::Tensor* const* inputs, int n, char** error) {
  KZC_TRY(error, nullptr, {
    torch::NoGradGuard no_grad;
    std::vector<c10::IValue> args;
    for (int i = 0; i < n; i++) args.emplace_back(*inputs[i]);
    auto out = m->forward(args);
    // A tuple of one tensor is that tensor; a model that returns several values is refused,
    // never cut to its first: the outputs would be silently incomplete.
    if (out.isTuple() && out.toTupleRef().elements().size() == 1) out = out.toTupleRef().elements()[0];
    if (out.isTuple())
      throw std::runtime_error("forward returned a tuple of " + std::to_string(out.toTupleRef().elements().size()) +
                               " values; a model must return one tensor (return the one output the pipeline writes)");
    if (!out.isTensor()) throw std::runtime_error("forward returned " + out.tagKind() + ", not a tensor; a model must return one tensor");
    return new torch::Tensor(out.toTensor());
  })
}

int kzc_jit_named_tensors(torch::jit::Module* m, void* user, kzc_named_tensor_fn f, char** error) {
  KZC_TRY(error, -1, {
    int n = 0;
    for (const auto& p : m->named_parameters(true)) {
      f(user, p.name.c_str(), 0, new torch::Tensor(p.value));
      n++;
    }
    for (const auto& b : m->named_buffers(true)) {
      f(user, b.name.c_str(), 1, new torch::Tensor(b.value));
      n++;
    }
    // Every other tensor the module holds: tensor attributes, and the constants of its methods'
    // graphs (a frozen module keeps its weights there). Each storage listed once.
    std::unordered_set<const void*> seen;
    for (const auto& p : m->named_parameters(true)) seen.insert(p.value.unsafeGetTensorImpl());
    for (const auto& b : m->named_buffers(true)) seen.insert(b.value.unsafeGetTensorImpl());
    for (const auto& a : m->named_attributes(true)) {
      if (a.value.isTensor() && seen.insert(a.value.toTensor().unsafeGetTensorImpl()).second) {
        f(user, ("attribute " + a.name).c_str(), 0, new torch::Tensor(a.value.toTensor()));
        n++;
      }
    }
    for (const auto& method : m->get_methods()) {
      int k = 0;
      for (auto* node : method.graph()->nodes()) {
        if (node->kind() != c10::prim::Constant) continue;
        auto value = torch::jit::toIValue(node->output());
        if (value && value->isTensor() && seen.insert(value->toTensor().unsafeGetTensorImpl()).second) {
          std::string name = "constant " + method.name() + "#" + std::to_string(k++);
          f(user, name.c_str(), 0, new torch::Tensor(value->toTensor()));
          n++;
        }
      }
    }
    return n;
  })
}

// Moves every parameter and buffer to `device` (one copy; the shared storages are released).
int kzc_jit_to(torch::jit::Module* m, int device_type, int device_index, char** error) {
  KZC_TRY(error, -1, {
    m->to(c10::Device(static_cast<c10::DeviceType>(device_type), static_cast<c10::DeviceIndex>(device_index)));
    return 0;
  })
}

}  // extern "C"
