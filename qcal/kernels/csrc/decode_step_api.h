/* DecodeStep (torch.classes.qcal.DecodeStep) and decode_layers: a Llama decoder stack's decode step for one token
   in one call, the loop of qcal.runtime.lean.LeanGenerator's decode step without Python between its steps. Per
   layer, in that loop's order:

       add_rmsnorm(x, delta, w_in, h);  attn = decode_step_attention(q(h), k(h), v(h), caches, pos, cos, sin, scale)
       add_rmsnorm(x, o(attn), w_post, h);  g = gate(h);  silu_mul(g, up(h));  delta = down(g)

   and returns the last delta. The same kernels run on the same arguments (the elementwise steps called directly,
   the attention through the dispatcher, each projection as its kernel bound once to its weights where its operator
   registers a binder (bound.h), else through the dispatcher), so the results are those of the Python loop bit for
   bit. A projection is any qcal operator whose first argument is the input rows and whose others are tensors,
   ints or bools: its name in `ops` and its other arguments, in schema order, taken in turn from `tensors` and `ints`
   (bools as 0 / 1). Shared by the AVX-512 and AVX2 builds; included at the end of decode_ops_api.h (it calls
   add_rmsnorm and silu_mul). The lists' structure, the bound projections' arguments and their shapes' chaining
   are checked when the step is planned, before x is touched; operators called through the dispatcher check their
   own arguments at the call. */
#ifndef QCAL_DECODE_STEP_API_H
#define QCAL_DECODE_STEP_API_H

#include <ATen/core/dispatch/Dispatcher.h>

#include "bound.h"
#include "parallel.h"

#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace qcal_step {

constexpr int kProjections = 7; // q, k, v, o, gate, up, down

// The operator qcal::<name> (looked up once per name).
static const c10::OperatorHandle &find_op(const char *step, const std::string &name) {
    static std::mutex mu;
    static std::unordered_map<std::string, c10::OperatorHandle> cache;
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(name);
    if (it == cache.end()) {
        auto handle = c10::Dispatcher::singleton().findSchema({"qcal::" + name, ""});
        TORCH_CHECK_VALUE(handle.has_value(), step, ": no operator qcal::", name);
        it = cache.emplace(name, *handle).first;
    }
    return it->second;
}

// A projection's call: its operator and where its arguments start in `tensors` / `ints`; where the operator has a
// binder (bound.h), the bound kernel and its output buffer (shared by the layers whose projection has its shape).
struct Projection {
    const c10::OperatorHandle *op;
    size_t tensor0, int0;
    std::string name; // "qcal::<operator>"
    qcal::Bound bound;
    at::Tensor out;
};

// Checks a projection's operator and arguments (the count of each kind its schema takes from the lists; the
// returned type); advances the list positions.
static Projection plan(const char *step, const std::string &name, const std::vector<at::Tensor> &tensors,
                       const std::vector<int64_t> &ints, size_t &ti, size_t &ii) {
    const c10::OperatorHandle &op = find_op(step, name);
    const c10::FunctionSchema &schema = op.schema();
    const auto &args = schema.arguments();
    TORCH_CHECK_VALUE(!args.empty() && args[0].type()->kind() == c10::TypeKind::TensorType && schema.returns().size() == 1
                          && schema.returns()[0].type()->kind() == c10::TypeKind::TensorType,
                      step, ": qcal::", name, " is not a projection (input rows first, one tensor returned): ", schema);
    Projection p{&op, ti, ii, "qcal::" + name, {}, {}};
    for (size_t a = 1; a < args.size(); a++) {
        const c10::TypeKind kind = args[a].type()->kind();
        if (kind == c10::TypeKind::TensorType) {
            TORCH_CHECK_VALUE(ti < tensors.size(), step, ": tensors ends before qcal::", name, "'s argument ",
                              args[a].name());
            ti++;
        } else if (kind == c10::TypeKind::IntType || kind == c10::TypeKind::BoolType) {
            TORCH_CHECK_VALUE(ii < ints.size(), step, ": ints ends before qcal::", name, "'s argument ",
                              args[a].name());
            TORCH_CHECK_VALUE(kind == c10::TypeKind::IntType || ints[ii] == 0 || ints[ii] == 1, step, ": qcal::", name,
                              "'s argument ", args[a].name(), " is a bool, got ", ints[ii]);
            ii++;
        } else {
            TORCH_CHECK_VALUE(false, step, ": qcal::", name, "'s argument ", args[a].name(), " is a ",
                              args[a].type()->str(), "; a projection takes tensors, ints and bools");
        }
    }
    return p;
}

// The projection's operator arguments, in schema order: x first where given, then those from `tensors` / `ints`.
static torch::jit::Stack arguments(const Projection &p, const std::vector<at::Tensor> &tensors,
                                   const std::vector<int64_t> &ints, const at::Tensor *x = nullptr) {
    const auto &args = p.op->schema().arguments();
    torch::jit::Stack out;
    out.reserve(args.size());
    if (x) out.emplace_back(*x);
    size_t ti = p.tensor0, ii = p.int0;
    for (size_t a = 1; a < args.size(); a++) {
        const c10::TypeKind kind = args[a].type()->kind();
        if (kind == c10::TypeKind::TensorType) out.emplace_back(tensors[ti++]);
        else if (kind == c10::TypeKind::BoolType) out.emplace_back(ints[ii++] != 0);
        else out.emplace_back(ints[ii++]);
    }
    return out;
}

// Binds p's kernel where its operator has a binder (checking its arguments as the operator would) and gives it an
// output buffer: `prev`'s where the shape is the same.
static void bind(Projection &p, const Projection *prev, const std::vector<at::Tensor> &tensors,
                 const std::vector<int64_t> &ints) {
    const auto it = qcal::binders().find(p.name.substr(6));
    if (it == qcal::binders().end()) return;
    p.bound = it->second(p.name.c_str(), arguments(p, tensors, ints));
    p.out = prev && prev->bound.run && prev->bound.N == p.bound.N ? prev->out
                                                                   : at::empty({1, p.bound.N}, at::kBFloat16);
}

static at::Tensor project(const Projection &p, const at::Tensor &x, const std::vector<at::Tensor> &tensors,
                          const std::vector<int64_t> &ints) {
    if (p.bound.run) { // x: h, the attention's output or the gate buffer (another operator's output if unbound)
        TORCH_CHECK_VALUE(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.numel() == p.bound.K, p.name,
                          ": x must be a contiguous bf16 (1, ", p.bound.K, "), got ", x.scalar_type(), " ",
                          x.sizes());
        qcal::check_rc(p.name.c_str(),
                       p.bound.run(qcal::in<uint16_t>(x), static_cast<uint16_t *>(p.out.mutable_data_ptr())));
        return p.out;
    }
    torch::jit::Stack stack = arguments(p, tensors, ints, &x);
    p.op->callBoxed(stack);
    return stack[0].toTensor();
}

} // namespace qcal_step

// A decoder stack's decode step, checked and planned once: norms, each layer's input and post-attention RMSNorm
// weights (eps their epsilons); k_cache / v_cache (layers, kv_heads, positions, head_dim); cos / sin the rotary
// tables of every position; ops / tensors / ints, each layer's seven projections. run(x, h, delta, pos): x (1, hidden)
// bf16, the residual stream (updated in place), h (1, hidden) bf16 scratch, delta the previous layer's output not yet
// added to x (or None), pos the new token's position; returns the last layer's output. Holding the arguments keeps
// the per-token call from converting hundreds of tensors.
struct DecodeStep : torch::CustomClassHolder {
    std::vector<at::Tensor> norms, tensors;
    std::vector<double> eps;
    std::vector<int64_t> ints;
    std::vector<qcal_step::Projection> plans;
    at::Tensor k_cache, v_cache, cos, sin;
    std::vector<at::Tensor> k_layers, v_layers; // the caches' layers, as views made once
    double scale;
    int64_t layers, hidden;
    bool team = true;

    DecodeStep(std::vector<at::Tensor> norms_, std::vector<double> eps_, at::Tensor k_cache_, at::Tensor v_cache_,
               at::Tensor cos_, at::Tensor sin_, double scale_, const std::vector<std::string> &ops,
               std::vector<at::Tensor> tensors_, std::vector<int64_t> ints_)
        : norms(std::move(norms_)), tensors(std::move(tensors_)), eps(std::move(eps_)), ints(std::move(ints_)),
          k_cache(std::move(k_cache_)), v_cache(std::move(v_cache_)), cos(std::move(cos_)), sin(std::move(sin_)),
          scale(scale_) {
        const char *step = "qcal::decode_layers";
        layers = k_cache.dim() == 4 ? k_cache.size(0) : -1;
        TORCH_CHECK_VALUE(layers >= 1 && v_cache.sizes() == k_cache.sizes(), step,
                          ": k_cache and v_cache must be (layers, kv_heads, positions, head_dim) alike, got ",
                          k_cache.sizes(), " and ", v_cache.sizes());
        TORCH_CHECK_VALUE(norms.size() == static_cast<size_t>(2 * layers) && eps.size() == norms.size(), step, ": ",
                          layers, " layers take ", 2 * layers, " norm weights and epsilons, got ", norms.size(),
                          " and ", eps.size());
        TORCH_CHECK_VALUE(ops.size() == static_cast<size_t>(qcal_step::kProjections * layers), step, ": ", layers,
                          " layers take ", qcal_step::kProjections * layers, " projections, got ", ops.size());
        hidden = norms[0].dim() == 1 ? norms[0].size(0) : -1;
        for (size_t i = 0; i < norms.size(); i++)
            qcal::check_tensor(step, i % 2 ? "a post-attention norm weight" : "an input norm weight", norms[i],
                               at::kBFloat16, {hidden});
        plans.reserve(ops.size());
        size_t ti = 0, ii = 0;
        for (const std::string &name : ops) plans.push_back(qcal_step::plan(step, name, tensors, ints, ti, ii));
        TORCH_CHECK_VALUE(ti == tensors.size() && ii == ints.size(), step, ": the projections take ", ti,
                          " tensors and ", ii, " ints, got ", tensors.size(), " and ", ints.size());
        constexpr int P = qcal_step::kProjections;
        for (size_t i = 0; i < plans.size(); i++)
            qcal_step::bind(plans[i], i >= P ? &plans[i - P] : nullptr, tensors, ints);
        for (int64_t l = 0; l < layers; l++) check_shapes(step, l);
        for (int64_t l = 0; l < layers; l++) {
            k_layers.push_back(k_cache.select(0, l));
            v_layers.push_back(v_cache.select(0, l));
        }
    }

    // The bound projections of layer l chain: q, k, v, gate and up read (1, hidden), o the attention's (1, q's N),
    // down (1, gate's N); o and down give (1, hidden). (Operators called through the dispatcher check at the call.)
    void check_shapes(const char *step, int64_t l) const {
        static const char *names[qcal_step::kProjections] = {"q", "k", "v", "o", "gate", "up", "down"};
        const qcal_step::Projection *p = plans.data() + qcal_step::kProjections * l;
        auto expect = [&](int j, int64_t K, int64_t N) {
            if (!p[j].bound.run) return;
            TORCH_CHECK_VALUE((K < 0 || p[j].bound.K == K) && (N < 0 || p[j].bound.N == N), step, ": layer ", l,
                              "'s ", names[j], " projection (", p[j].name, ") is (", p[j].bound.K, " -> ",
                              p[j].bound.N, "), expected (", K < 0 ? std::string("any") : std::to_string(K), " -> ",
                              N < 0 ? std::string("any") : std::to_string(N), ")");
        };
        const auto n_of = [&](int j) { return p[j].bound.run ? p[j].bound.N : int64_t(-1); };
        for (int j : {0, 1, 2}) expect(j, hidden, -1);
        expect(3, n_of(0), hidden);
        expect(4, hidden, -1);
        expect(5, hidden, n_of(4));
        expect(6, n_of(4) >= 0 ? n_of(4) : n_of(5), hidden);
    }

    at::Tensor run(at::Tensor x, at::Tensor h, const std::optional<at::Tensor> &delta, int64_t pos) {
        const char *step = "qcal::decode_layers";
        bf16_cpu(step, "x", x);
        TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == 1 && x.size(1) == hidden && x.is_contiguous(), step,
                          ": x must be a contiguous (1, hidden) with hidden = ", hidden, ", got ", x.sizes());
        qcal::check_tensor(step, "h", h, at::kBFloat16, x.sizes());
        if (delta.has_value()) qcal::check_tensor(step, "delta", *delta, at::kBFloat16, x.sizes());
#if QCAL_STEP_TEAM
        const int threads = qcal::threads();
        if (team && threads > 1) { // one OpenMP region for the step, its kernels' parallel parts posted to its team
            at::Tensor out;
            qcal_lead_team(threads, [&] { out = layer_loop(x, h, delta, pos); });
            return out;
        }
#endif
        return layer_loop(x, h, delta, pos);
    }

    // Whether run keeps the threads in one team for the step (where the build's step operators all post to it).
    bool set_team(bool on) {
        const bool was = team;
        team = on;
        return was;
    }

    at::Tensor layer_loop(at::Tensor &x, at::Tensor &h, const std::optional<at::Tensor> &delta, int64_t pos) {
        const char *step = "qcal::decode_layers";
        static const c10::OperatorHandle &attention = qcal_step::find_op(step, "decode_step_attention");
        at::Tensor d = delta.has_value() ? *delta : at::Tensor();
        auto project = [&](const qcal_step::Projection &p, const at::Tensor &in) {
            return qcal_step::project(p, in, tensors, ints);
        };
        for (int64_t l = 0; l < layers; l++) {
            const qcal_step::Projection *p = plans.data() + qcal_step::kProjections * l;
            add_rmsnorm(x, d.defined() ? std::optional<at::Tensor>(d) : std::nullopt, norms[2 * l], h, eps[2 * l]);
            torch::jit::Stack stack;
            stack.reserve(9);
            for (int j = 0; j < 3; j++) stack.emplace_back(project(p[j], h));
            stack.emplace_back(k_layers[l]);
            stack.emplace_back(v_layers[l]);
            stack.emplace_back(pos);
            stack.emplace_back(cos);
            stack.emplace_back(sin);
            stack.emplace_back(scale);
            attention.callBoxed(stack);
            const at::Tensor attn = stack[0].toTensor();
            add_rmsnorm(x, project(p[3], attn), norms[2 * l + 1], h, eps[2 * l + 1]);
            at::Tensor gate = project(p[4], h);
            silu_mul(gate, project(p[5], h));
            d = project(p[6], gate);
        }
        return plans.back().bound.run ? d.clone() : d; // not the buffer the next step writes
    }
};

// The step as one operator: DecodeStep's arguments and run's, planned on every call.
static at::Tensor decode_layers(at::Tensor &x, at::Tensor &h, const std::optional<at::Tensor> &delta,
                                const std::vector<at::Tensor> &norms, const std::vector<double> &eps,
                                at::Tensor &k_cache, at::Tensor &v_cache, int64_t pos, const at::Tensor &cos,
                                const at::Tensor &sin, double scale, const std::vector<std::string> &ops,
                                const std::vector<at::Tensor> &tensors, const std::vector<int64_t> &ints) {
    DecodeStep plan(norms, eps, k_cache, v_cache, cos, sin, scale, ops, tensors, ints);
    return plan.run(x, h, delta, pos);
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.class_<DecodeStep>("DecodeStep")
        .def(torch::init<std::vector<at::Tensor>, std::vector<double>, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         double, const std::vector<std::string> &, std::vector<at::Tensor>, std::vector<int64_t>>())
        .def("run", &DecodeStep::run)
        .def("set_team", &DecodeStep::set_team);
    m.def("decode_layers(Tensor(a!) x, Tensor(b!) h, Tensor? delta, Tensor[] norms, float[] eps, Tensor(c!) k_cache, "
          "Tensor(d!) v_cache, int pos, Tensor cos, Tensor sin, float scale, str[] ops, Tensor[] tensors, int[] ints) "
          "-> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) { m.impl("decode_layers", &decode_layers); }

#endif
