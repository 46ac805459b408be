// Dump llama.cpp graph tensors (f32) of one llama_decode per batch, for op-by-op comparison with our reference
// (tests/reference/compare_llama_dump.py has the commands). Not built or run by CI.
//
// Build against the existing llama.cpp CPU build (shared libs; nothing else is rebuilt):
//   cd /work/llama/llama.cpp && g++ -O1 -std=c++17 -I include -I ggml/include -I common -I vendor \
//       /work/main/tests/reference/llama_tensor_dump.cpp -o /tmp/llama_tensor_dump -L build/bin \
//       -lllama-common -lllama -lggml -lggml-base -Wl,-rpath,/work/llama/llama.cpp/build/bin
// Run (usual llama.cpp arguments; env: DUMP_DIR output folder, DUMP_TOKENS file of token ids one per line,
// DUMP_RE regex of tensor names to dump, DUMP_SPLIT n = first batch of n tokens then one token per batch):
//   DUMP_DIR=/tmp/d DUMP_TOKENS=toks.txt DUMP_RE=. /tmp/llama_tensor_dump -m MODEL.gguf -c 288 -b 288 -t 2
// Each tensor goes to DUMP_DIR/<batch index>__<name>.bin: 8 int64 (ne[4], nb[4]) then the raw f32 data.
#include "arg.h"
#include "common.h"
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"
#include <cstdio>
#include <cstdlib>
#include <regex>
#include <string>
#include <vector>
#include <clocale>
#include <fstream>

static std::string g_dir;
static std::regex g_re;
static int g_call = 0;

static bool cb(struct ggml_tensor * t, bool ask, void * ud) {
    if (ask) return std::regex_search(t->name, g_re);
    if (t->type != GGML_TYPE_F32) return true;
    std::vector<char> buf(ggml_nbytes(t));
    ggml_backend_tensor_get(t, buf.data(), 0, buf.size());
    std::string fn = g_dir + "/" + std::to_string(g_call) + "__" + t->name + ".bin";
    FILE * f = fopen(fn.c_str(), "wb");
    int64_t hdr[8] = {t->ne[0], t->ne[1], t->ne[2], t->ne[3], (int64_t)t->nb[0], (int64_t)t->nb[1], (int64_t)t->nb[2], (int64_t)t->nb[3]};
    fwrite(hdr, sizeof(hdr), 1, f);
    fwrite(buf.data(), 1, buf.size(), f);
    fclose(f);
    return true;
}

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    common_params params;
    common_init();
    if (!common_params_parse(argc, argv, params, LLAMA_EXAMPLE_COMMON)) return 1;
    g_dir = getenv("DUMP_DIR");
    g_re = std::regex(getenv("DUMP_RE") ? getenv("DUMP_RE") : ".*");
    llama_backend_init();
    params.cb_eval = cb;
    params.cb_eval_user_data = nullptr;
    params.warmup = false;
    auto init = common_init_from_params(params);
    auto * ctx = init->context();
    std::vector<llama_token> toks;
    std::ifstream in(getenv("DUMP_TOKENS"));
    int x; while (in >> x) toks.push_back(x);
    // env DUMP_SPLIT=n: decode first n tokens as one batch, then the rest one at a time (decode path)
    int split = getenv("DUMP_SPLIT") ? atoi(getenv("DUMP_SPLIT")) : (int)toks.size();
    int pos = 0;
    while (pos < (int)toks.size()) {
        int n = pos == 0 ? split : 1;
        llama_batch b = llama_batch_get_one(toks.data() + pos, n);
        if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
        pos += n; g_call++;
    }
    llama_backend_free();
    return 0;
}
