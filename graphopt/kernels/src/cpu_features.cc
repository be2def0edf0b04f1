// Which instruction-set tier this process may use: the CPU's features and the OS's support.
//
// A CPU flag alone is not enough: AVX and AVX-512 registers are usable only when the OS saves
// them on a context switch (XCR0, read with xgetbv). A VM or a kernel booted with AVX-512
// disabled reports the CPUID bits but would fault on the first zmm instruction.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define GRAPHOPT_X86 1
#endif

namespace graphopt {
namespace {

#if defined(GRAPHOPT_X86)
// xgetbv through inline asm: the _xgetbv intrinsic needs -mxsave, and this file is compiled
// for the baseline ISA.
unsigned long long read_xcr0() {
  unsigned int eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

Isa probe() {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return Isa::Scalar;
  const bool osxsave = ecx & (1u << 27);
  const bool avx = ecx & (1u << 28);
  const bool fma = ecx & (1u << 12);
  const bool f16c = ecx & (1u << 29);
  if (!osxsave || !avx) return Isa::Scalar;
  const unsigned long long xcr0 = read_xcr0();
  // Bits 1-2: SSE and AVX (ymm) state; 5-7: opmask, upper zmm0-15, zmm16-31.
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;
  if (!os_avx) return Isa::Scalar;
  if (__get_cpuid_max(0, nullptr) < 7) return Isa::Scalar;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool avx2 = ebx & (1u << 5);
  const bool avx512f = ebx & (1u << 16);
  const bool avx512dq = ebx & (1u << 17);
  const bool avx512bw = ebx & (1u << 30);
  const bool avx512vl = ebx & (1u << 31);
  const bool avx512vnni = ecx & (1u << 11);
  if (!(avx2 && fma && f16c)) return Isa::Scalar;
  if (!(os_avx512 && avx512f && avx512dq && avx512bw && avx512vl)) return Isa::Avx2;
  return avx512vnni ? Isa::Avx512Vnni : Isa::Avx512;
}
#else
Isa probe() { return Isa::Scalar; }
#endif

// GRAPHOPT_KERNELS_ISA's tier, or -1 when it is unset or empty (no cap) or names no tier.
int cap_tier(const char* value) {
  if (value == nullptr || *value == '\0') return -1;
  for (int tier = 0; tier <= static_cast<int>(Isa::Avx512Vnni); ++tier) {
    if (std::strcmp(value, isa_name(static_cast<Isa>(tier))) == 0) return tier;
  }
  return -1;
}

// The variable is for tests and for ruling out a misbehaving tier, never for claiming one the
// CPU lacks. An unknown value caps nothing here (a kernel has no way to report it); the ORT
// binding refuses it through unknown_isa_cap() before any kernel runs.
Isa cap_from_environment(Isa detected) {
  const int tier = cap_tier(std::getenv("GRAPHOPT_KERNELS_ISA"));
  if (tier < 0) return detected;
  return tier < static_cast<int>(detected) ? static_cast<Isa>(tier) : detected;
}

}  // namespace

Isa detect_isa() {
  static const Isa detected = probe();  // thread-safe one-time initialisation
  return detected;
}

Isa selected_isa() {
  // Read on every call (cheap) so a test can change the variable between runs in a process.
  return cap_from_environment(detect_isa());
}

const char* unknown_isa_cap() {
  const char* value = std::getenv("GRAPHOPT_KERNELS_ISA");
  if (value == nullptr || *value == '\0' || cap_tier(value) >= 0) return nullptr;
  return value;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return "scalar";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx512Vnni:
      return "avx512vnni";
  }
  return "unknown";
}

}  // namespace graphopt
