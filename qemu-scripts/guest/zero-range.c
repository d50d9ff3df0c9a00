/*
 * zero-range: fallocate(2) on a block device, to make the guest kernel send
 * write-zeroes requests (busybox's blkdiscard has no -z). On a block device
 * the kernel turns FALLOC_FL_ZERO_RANGE and FALLOC_FL_PUNCH_HOLE into
 * write-zeroes (the latter allowing the device to unmap) *without* falling
 * back to writing zero pages: it fails with EOPNOTSUPP when the device has
 * no write-zeroes support. So success means the device zeroed the range.
 *
 * usage: zero-range zero|punch DEVICE OFFSET LENGTH   (bytes)
 * Built static by the host test (gcc -static) and copied into the share.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int parse(const char *s, off_t *out)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || *s == '\0' || *end != '\0' || v > (unsigned long long)INT64_MAX)
		return -1;
	*out = (off_t)v;
	return 0;
}

int main(int argc, char **argv)
{
	off_t off, len;
	int mode, fd;

	if (argc != 5 || parse(argv[3], &off) || parse(argv[4], &len)) {
		fprintf(stderr, "usage: zero-range zero|punch DEVICE OFFSET LENGTH\n");
		return 2;
	}
	if (strcmp(argv[1], "zero") == 0)
		mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
	else if (strcmp(argv[1], "punch") == 0)
		mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
	else {
		fprintf(stderr, "zero-range: mode must be zero or punch, not %s\n", argv[1]);
		return 2;
	}
	fd = open(argv[2], O_RDWR);
	if (fd < 0) {
		fprintf(stderr, "zero-range: %s: %s\n", argv[2], strerror(errno));
		return 1;
	}
	if (fallocate(fd, mode, off, len) != 0) {
		fprintf(stderr, "zero-range: %s %s [%lld, +%lld): %s\n", argv[1], argv[2],
			(long long)off, (long long)len, strerror(errno));
		close(fd);
		return 1;
	}
	close(fd);
	return 0;
}
