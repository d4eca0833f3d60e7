/*
 * nvmirror's fio external ioengine, the C half: fio's ioengine_ops on top of the C ABI of
 * the nvmirror-fio crate (fio/src/ffi.rs), which opens the legs, joins them into a mirrored
 * volume in-process and gives each fio thread its own queue pair. This file only moves io_u
 * fields across that ABI; fio/build.sh compiles it against fio's own headers.
 *
 *   fio --thread --ioengine=external:build/fio/libnvmirror_fio.so \
 *       --leg=mem://1GiB --leg=mem://1GiB --name=t --rw=randwrite --bs=4k --iodepth=32
 *
 * Options: leg=URI (once per leg, primary first), nvmirror_bitmap=1 (format the legs as a
 * persistent volume with a write-intent bitmap). The job's size is the volume's.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fio.h"
#include "optgroup.h"

/* The Rust half (fio/src/ffi.rs). */
struct nvmirror_dev;
struct nvmirror_queue;
extern const struct nvmirror_dev *nvmirror_fio_open(const char *legs, int bitmap, char *err,
						    size_t err_len);
extern void nvmirror_fio_close(const struct nvmirror_dev *dev);
extern uint64_t nvmirror_fio_size(const struct nvmirror_dev *dev);
extern struct nvmirror_queue *nvmirror_fio_queue_open(const struct nvmirror_dev *dev,
						      uint32_t depth, char *err, size_t err_len);
extern void nvmirror_fio_queue_close(struct nvmirror_queue *q);
extern int nvmirror_fio_submit(struct nvmirror_queue *q, int op, uint64_t offset, uint64_t len,
			       void *buf, uint64_t tag);
extern uint32_t nvmirror_fio_poll(struct nvmirror_queue *q, uint64_t *tags, int *errs,
				  uint32_t max);

#define NVMIRROR_SUBMIT_BUSY 1
#define NVMIRROR_LEGS_MAX 8192

struct nvmirror_options {
	void *pad; /* fio needs a non-zero offset for the first real option */
	unsigned int bitmap;
	char legs[NVMIRROR_LEGS_MAX]; /* URIs, one a line, in --leg order */
};

/* Per-thread state. */
struct nvmirror_data {
	const struct nvmirror_dev *dev;
	struct nvmirror_queue *q;
	struct io_u **by_index; /* io_u->index -> the io_u in flight */
	unsigned int slots;
	struct io_u **events;
	uint64_t *tags;
	int *errs;
};

/* Each --leg= (or leg= line in a job file) appends one URI. */
static int str_leg_cb(void *data, const char *str)
{
	struct nvmirror_options *o = data;
	size_t have = strlen(o->legs), add = strlen(str);

	if (!add) {
		log_err("nvmirror: leg= needs a URI\n");
		return 1;
	}
	if (have + add + 2 > sizeof(o->legs)) {
		log_err("nvmirror: too many or too long leg= options\n");
		return 1;
	}
	memcpy(o->legs + have, str, add);
	o->legs[have + add] = '\n';
	o->legs[have + add + 1] = '\0';
	return 0;
}

static struct fio_option options[] = {
	{
		.name = "leg",
		.lname = "nvmirror leg",
		.type = FIO_OPT_STR,
		.cb = str_leg_cb,
		.help = "A leg of the mirrored volume, once per leg, primary first "
			"(mem://1GiB, file:///path, nvme-tcp://host:port/nqn, ...)",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = "nvmirror_bitmap",
		.lname = "nvmirror write-intent bitmap",
		.type = FIO_OPT_BOOL,
		.off1 = offsetof(struct nvmirror_options, bitmap),
		.help = "Format the legs as a persistent volume with a write-intent bitmap",
		.def = "0",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = NULL,
	},
};

static void nvmirror_free(struct nvmirror_data *d)
{
	if (!d)
		return;
	if (d->q)
		nvmirror_fio_queue_close(d->q);
	if (d->dev)
		nvmirror_fio_close(d->dev);
	free(d->by_index);
	free(d->events);
	free(d->tags);
	free(d->errs);
	free(d);
}

/* Before the threads start: open (or share) the volume, so that its size is known. */
static int nvmirror_setup(struct thread_data *td)
{
	struct nvmirror_options *o = td->eo;
	struct nvmirror_data *d;
	char err[512] = "";

	if (td->io_ops_data)
		return 0;
	if (!td->o.use_thread) {
		log_err("nvmirror: the volume lives in fio's process; run with --thread\n");
		return 1;
	}
	d = calloc(1, sizeof(*d));
	if (!d)
		return 1;
	d->dev = nvmirror_fio_open(o->legs, o->bitmap != 0, err, sizeof(err));
	if (!d->dev) {
		log_err("nvmirror: %s\n", err);
		free(d);
		return 1;
	}
	td->io_ops_data = d;
	return 0;
}

/* In the job's thread: its own queue pair, iodepth deep. */
static int nvmirror_init(struct thread_data *td)
{
	struct nvmirror_data *d = td->io_ops_data;
	unsigned int depth = td->o.iodepth ? td->o.iodepth : 1;
	char err[512] = "";

	if (!d)
		return 1;
	/* io_u indexes run up to the number of io_us fio allocates (iodepth, more with verify). */
	d->slots = depth * 2 + 8;
	d->by_index = calloc(d->slots, sizeof(*d->by_index));
	d->events = calloc(depth, sizeof(*d->events));
	d->tags = calloc(depth, sizeof(*d->tags));
	d->errs = calloc(depth, sizeof(*d->errs));
	if (!d->by_index || !d->events || !d->tags || !d->errs)
		return 1;
	d->q = nvmirror_fio_queue_open(d->dev, depth, err, sizeof(err));
	if (!d->q) {
		log_err("nvmirror: %s\n", err);
		return 1;
	}
	return 0;
}

static enum fio_q_status nvmirror_queue(struct thread_data *td, struct io_u *io_u)
{
	struct nvmirror_data *d = td->io_ops_data;
	int op, rc;

	fio_ro_check(td, io_u);
	switch (io_u->ddir) {
	case DDIR_READ:
		op = 0;
		break;
	case DDIR_WRITE:
		op = 1;
		break;
	case DDIR_SYNC:
	case DDIR_DATASYNC:
		op = 2;
		break;
	case DDIR_TRIM:
		op = 3;
		break;
	default:
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	if (io_u->index >= d->slots) {
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	rc = nvmirror_fio_submit(d->q, op, io_u->offset, io_u->xfer_buflen, io_u->xfer_buf,
				 io_u->index);
	if (rc == NVMIRROR_SUBMIT_BUSY)
		return FIO_Q_BUSY;
	if (rc < 0) {
		io_u->error = -rc;
		return FIO_Q_COMPLETED;
	}
	d->by_index[io_u->index] = io_u;
	return FIO_Q_QUEUED;
}

/* What queue() queued goes to the legs at the next poll, in getevents: polling here as well
 * doubled the polls per I/O and cost about 3 % of the IOPS. */
static int nvmirror_commit(struct thread_data *td)
{
	return 0;
}

static int nvmirror_getevents(struct thread_data *td, unsigned int min, unsigned int max,
			      const struct timespec *t)
{
	struct nvmirror_data *d = td->io_ops_data;
	unsigned int depth = td->o.iodepth ? td->o.iodepth : 1;
	unsigned int n = 0, i, got;
	struct timespec start;

	if (max > depth)
		max = depth;
	if (t)
		clock_gettime(CLOCK_MONOTONIC, &start);
	for (;;) {
		got = nvmirror_fio_poll(d->q, d->tags + n, d->errs + n, max - n);
		for (i = n; i < n + got; i++) {
			struct io_u *io_u = d->by_index[d->tags[i]];

			d->by_index[d->tags[i]] = NULL;
			io_u->error = d->errs[i];
			io_u->resid = io_u->error ? io_u->xfer_buflen : 0;
			d->events[i] = io_u;
		}
		n += got;
		if (n >= min || n >= max)
			break;
		if (t) {
			struct timespec now;
			uint64_t waited, limit;

			clock_gettime(CLOCK_MONOTONIC, &now);
			waited = (now.tv_sec - start.tv_sec) * 1000000000ULL + now.tv_nsec -
				 start.tv_nsec;
			limit = t->tv_sec * 1000000000ULL + t->tv_nsec;
			if (waited >= limit)
				break;
		}
	}
	return n;
}

static struct io_u *nvmirror_event(struct thread_data *td, int event)
{
	struct nvmirror_data *d = td->io_ops_data;

	return d->events[event];
}

static void nvmirror_cleanup(struct thread_data *td)
{
	nvmirror_free(td->io_ops_data);
	td->io_ops_data = NULL;
}

static int nvmirror_open_file(struct thread_data *td, struct fio_file *f)
{
	return 0;
}

static int nvmirror_close_file(struct thread_data *td, struct fio_file *f)
{
	return 0;
}

/* The job's "file" is the volume: its size is the volume's. */
static int nvmirror_get_file_size(struct thread_data *td, struct fio_file *f)
{
	struct nvmirror_data *d = td->io_ops_data;

	if (!d)
		return 1;
	f->real_file_size = nvmirror_fio_size(d->dev);
	fio_file_set_size_known(f);
	return 0;
}

struct ioengine_ops ioengine = {
	.name = "nvmirror",
	.version = FIO_IOOPS_VERSION,
	.flags = FIO_DISKLESSIO | FIO_NODISKUTIL,
	.setup = nvmirror_setup,
	.init = nvmirror_init,
	.queue = nvmirror_queue,
	.commit = nvmirror_commit,
	.getevents = nvmirror_getevents,
	.event = nvmirror_event,
	.cleanup = nvmirror_cleanup,
	.open_file = nvmirror_open_file,
	.close_file = nvmirror_close_file,
	.get_file_size = nvmirror_get_file_size,
	.options = options,
	.option_struct_size = sizeof(struct nvmirror_options),
};
