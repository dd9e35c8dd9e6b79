/* LD_PRELOAD shim for the Orthanc interoperability test (part of ricord-archive's tests).
 * Orthanc 1.10 has no bind-address option and listens on every interface; the test keeps it
 * on loopback: bind() to the IPv4 or IPv6 wildcard address becomes bind() to loopback. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_function)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *address, socklen_t length) {
    bind_function next = (bind_function)dlsym(RTLD_NEXT, "bind");
    if (address != NULL && address->sa_family == AF_INET && length >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in local;
        memcpy(&local, address, sizeof local);
        if (local.sin_addr.s_addr == htonl(INADDR_ANY)) {
            local.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        }
        return next(fd, (const struct sockaddr *)&local, sizeof local);
    }
    if (address != NULL && address->sa_family == AF_INET6
            && length >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 local;
        memcpy(&local, address, sizeof local);
        if (memcmp(&local.sin6_addr, &in6addr_any, sizeof local.sin6_addr) == 0) {
            local.sin6_addr = in6addr_loopback;
        }
        return next(fd, (const struct sockaddr *)&local, sizeof local);
    }
    return next(fd, address, length);
}
