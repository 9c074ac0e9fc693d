/* Hide ISA extensions from CPUID in one process tree, so the AVX2 code paths of ONNX Runtime (MLAS),
 * numpy and any library that dispatches on CPUID run on a CPU that has AVX-512.
 *
 * Loaded with LD_PRELOAD by benchmarks/isa_mask.py. Its constructor turns on CPUID faulting for
 * the process (arch_prctl(ARCH_SET_CPUID, 0); Linux, and a CPU or hypervisor with `cpuid_fault`
 * in /proc/cpuinfo): every CPUID instruction then raises SIGSEGV, which the handler answers with
 * the real CPUID's result less the hidden bits and steps over. Threads inherit the setting; exec
 * clears it, and LD_PRELOAD (inherited) sets it again in the new program. Programs that install
 * their own SIGSEGV handler (Python's faulthandler, gcc) keep it: sigaction() and signal() are
 * interposed, their handler is kept aside and called for every SIGSEGV that is not a CPUID.
 *
 * ISA_MASK=avx2 (environment) hides AVX-512 (every subset) and AVX-VNNI: an AVX2/FMA/F16C CPU
 * such as EPYC Zen 2/3. Unset or another value: nothing is hidden.
 * Code compiled for AVX-512 still runs (the instructions exist): only CPUID dispatch is masked.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012

/* CPUID leaf 7 subleaf 0: AVX-512 F DQ IFMA PF ER CD BW VL (EBX); VBMI VBMI2 VNNI BITALG
 * VPOPCNTDQ (ECX); 4VNNIW 4FMAPS VP2INTERSECT FP16 (EDX). Subleaf 1, EAX: AVX-VNNI, AVX512_BF16. */
static const unsigned EBX7 = (1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) |
                             (1u << 28) | (1u << 30) | (1u << 31);
static const unsigned ECX7 = (1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14);
static const unsigned EDX7 = (1u << 2) | (1u << 3) | (1u << 8) | (1u << 23);
static const unsigned EAX7_1 = (1u << 4) | (1u << 5);

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction;
static int active;
static struct sigaction program_action;  /* the program's own SIGSEGV action (default: SIG_DFL) */

static void on_segv(int sig, siginfo_t *info, void *context) {
    greg_t *r = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) {  /* a real fault: the program's handler, or the default */
        if (program_action.sa_flags & SA_SIGINFO) {
            program_action.sa_sigaction(sig, info, context);
        } else if (program_action.sa_handler != SIG_DFL && program_action.sa_handler != SIG_IGN) {
            program_action.sa_handler(sig);
        } else {
            struct sigaction dfl;
            memset(&dfl, 0, sizeof dfl);
            dfl.sa_handler = SIG_DFL;
            real_sigaction(SIGSEGV, &dfl, 0);  /* returning re-runs the access: the default action */
        }
        return;
    }
    unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, a, b, c, d);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {
        b &= ~EBX7; c &= ~ECX7; d &= ~EDX7;
    } else if (leaf == 7 && sub == 1) {
        a &= ~EAX7_1;
    }
    r[REG_RAX] = a; r[REG_RBX] = b; r[REG_RCX] = c; r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (!active || sig != SIGSEGV) return real_sigaction(sig, act, old);
    if (old) *old = program_action;
    if (act) program_action = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    static sighandler_t (*real_signal)(int, sighandler_t);
    if (!active || sig != SIGSEGV) {  /* every other call keeps libc's own semantics */
        if (!real_signal) real_signal = (sighandler_t (*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
        return real_signal(sig, handler);
    }
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

__attribute__((constructor)) static void isa_mask_init(void) {
    const char *level = getenv("ISA_MASK");
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (!level || strcmp(level, "avx2") != 0) return;  /* unset or unknown: nothing hidden */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    program_action.sa_handler = SIG_DFL;
    if (real_sigaction(SIGSEGV, &sa, &program_action) == 0) {
        active = 1;
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    }
}
