// Finds a kernel's static `__shared__` variables in the ELF symbol table of the extension and
// poisons them before every block (see shared_poison.h).
#include "sim/shared_poison.h"

#include <dlfcn.h>
#include <elf.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace cbam {
namespace sim {
namespace {

struct Var {
  unsigned char* p;
  size_t n;
};

struct Image {
  bool loaded = false;
  uintptr_t base = 0;
  std::unordered_map<uintptr_t, std::string> funcs;           // st_value -> name
  std::vector<std::pair<std::string, std::pair<uintptr_t, size_t>>> statics;  // _ZZ objects
};

std::mutex g_mu;
Image g_image;
std::unordered_map<const void*, std::vector<Var>> g_cache;
const std::vector<Var>* g_selected = nullptr;

void load_image() {
  g_image.loaded = true;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&poison_static_shared), &info) == 0 || !info.dli_fname)
    return;
  g_image.base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  std::ifstream f(info.dli_fname, std::ios::binary);
  if (!f) return;
  std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (data.size() < sizeof(Elf64_Ehdr)) return;
  Elf64_Ehdr eh;
  std::memcpy(&eh, data.data(), sizeof eh);
  if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 || eh.e_ident[EI_CLASS] != ELFCLASS64) return;
  if (eh.e_shoff == 0 || eh.e_shentsize != sizeof(Elf64_Shdr) ||
      eh.e_shoff + static_cast<uint64_t>(eh.e_shnum) * sizeof(Elf64_Shdr) > data.size())
    return;
  std::vector<Elf64_Shdr> sh(eh.e_shnum);
  std::memcpy(sh.data(), data.data() + eh.e_shoff, eh.e_shnum * sizeof(Elf64_Shdr));
  std::unordered_map<uintptr_t, bool> seen_obj;
  for (const Elf64_Shdr& s : sh) {
    if (s.sh_type != SHT_SYMTAB && s.sh_type != SHT_DYNSYM) continue;
    if (s.sh_link >= sh.size() || s.sh_entsize != sizeof(Elf64_Sym)) continue;
    const Elf64_Shdr& strs = sh[s.sh_link];
    if (s.sh_offset + s.sh_size > data.size() || strs.sh_offset + strs.sh_size > data.size())
      continue;
    const char* strtab = data.data() + strs.sh_offset;
    const size_t n = s.sh_size / sizeof(Elf64_Sym);
    for (size_t i = 0; i < n; ++i) {
      Elf64_Sym sym;
      std::memcpy(&sym, data.data() + s.sh_offset + i * sizeof(Elf64_Sym), sizeof sym);
      if (sym.st_name >= strs.sh_size || sym.st_value == 0 || sym.st_shndx == SHN_UNDEF) continue;
      const char* name = strtab + sym.st_name;
      const int type = ELF64_ST_TYPE(sym.st_info);
      if (type == STT_FUNC) {
        g_image.funcs.emplace(sym.st_value, name);
      } else if (type == STT_OBJECT && sym.st_size > 0 && std::strncmp(name, "_ZZ", 3) == 0) {
        if (seen_obj.emplace(sym.st_value, true).second)
          g_image.statics.push_back({name, {sym.st_value, sym.st_size}});
      }
    }
  }
}

const std::vector<Var>& lookup(const void* kernel) {
  auto it = g_cache.find(kernel);
  if (it != g_cache.end()) return it->second;
  if (!g_image.loaded) load_image();
  std::vector<Var> vars;
  const uintptr_t rel = reinterpret_cast<uintptr_t>(kernel) - g_image.base;
  auto f = g_image.funcs.find(rel);
  if (f != g_image.funcs.end() && f->second.size() > 2 && f->second.compare(0, 2, "_Z") == 0) {
    const std::string enc = f->second.substr(2);
    const std::string p1 = "_ZZ" + enc + "E", p2 = "_ZZZ" + enc + "E";
    for (const auto& [name, where] : g_image.statics) {
      if (name.compare(0, p1.size(), p1) == 0 || name.compare(0, p2.size(), p2) == 0)
        vars.push_back(Var{reinterpret_cast<unsigned char*>(g_image.base + where.first),
                           where.second});
    }
  }
  return g_cache.emplace(kernel, std::move(vars)).first->second;
}

}  // namespace

void select_static_shared(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_selected = &lookup(kernel);
}

void poison_static_shared() {
  if (!g_selected) return;
  for (const Var& v : *g_selected) std::memset(v.p, 0xff, v.n);
}

bool in_static_shared(const void* p, unsigned long bytes) {
  if (!g_selected) return false;
  const auto a = reinterpret_cast<uintptr_t>(p);
  for (const Var& v : *g_selected) {
    const auto lo = reinterpret_cast<uintptr_t>(v.p);
    if (a < lo + v.n && a + bytes > lo) return true;
  }
  return false;
}

void selected_static_shared_info(unsigned long* bytes, unsigned long* count) {
  std::lock_guard<std::mutex> lock(g_mu);
  *bytes = 0;
  *count = 0;
  if (!g_selected) return;
  *count = g_selected->size();
  for (const Var& v : *g_selected) *bytes += v.n;
}

void static_shared_info(const void* kernel, unsigned long* bytes, unsigned long* count) {
  std::lock_guard<std::mutex> lock(g_mu);
  const auto& vars = lookup(kernel);
  *bytes = 0;
  *count = vars.size();
  for (const Var& v : vars) *bytes += v.n;
}

}  // namespace sim
}  // namespace cbam
