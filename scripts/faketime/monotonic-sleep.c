/*
 * Debian 12's libfaketime (0.9.10) mishandles clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, ...) when the
 * monotonic clock is not faked (FAKETIME_DONT_FAKE_MONOTONIC=1): it shifts the deadline by the realtime offset,
 * so a moved-back clock makes the kernel answer EINVAL and a moved-forward one makes every sleep return at once
 * (upstream libfaketime issue 426). Python 3.11's time.sleep() makes exactly that call. Preloaded *before*
 * libfaketime, this goes straight to the kernel for the monotonic clock, which faketime leaves alone anyway,
 * and hands every other clock on to libfaketime.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *request, struct timespec *remain) {
    if (clock_id == CLOCK_MONOTONIC) {
        long failed = syscall(SYS_clock_nanosleep, clock_id, flags, request, remain);
        return failed ? errno : 0;
    }
    int (*next)(clockid_t, int, const struct timespec *, struct timespec *) =
        (int (*)(clockid_t, int, const struct timespec *, struct timespec *))dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clock_id, flags, request, remain);
}
