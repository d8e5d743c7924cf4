# shellcheck shell=bash
# Helpers sourced by tpu_scripts/jlora-tpu: messages, quoting, the dry-run/trace runner, and what the
# launcher knows about TPU accelerator types. Nothing here runs on its own.

JT_PROG=${JT_PROG:-jlora-tpu}
JT_CMD=${JT_CMD:-}   # the subcommand, for messages
DRY_RUN=${DRY_RUN:-0}

# die [CODE] MESSAGE...: one line on stderr, then exit (2: bad usage, the default).
die() {
	local code=2
	if [[ $# -gt 1 && $1 =~ ^[0-9]+$ ]]; then
		code=$1
		shift
	fi
	printf '%s%s: %s\n' "$JT_PROG" "${JT_CMD:+ $JT_CMD}" "$*" >&2
	exit "$code"
}

# note MESSAGE: progress on stderr (stdout is the dry-run listing and the program's own output).
note() {
	printf '%s: %s\n' "$JT_PROG" "$*" >&2
}

_jt_safe_word() {
	[[ -n $1 && $1 =~ ^[A-Za-z0-9_./:=@%+,^-]+$ ]]
}

# q_sq WORD: WORD as one shell word; bare when that is safe, else in single quotes.
q_sq() {
	if _jt_safe_word "$1"; then
		printf '%s' "$1"
	else
		local s=${1//\'/\'\\\'\'}
		printf "'%s'" "$s"
	fi
}

# q_dq WORD: like q_sq but prefers double quotes, so the result nests inside a single-quoted
# --command='...' without '\'' noise. Falls back to single quotes when the word has $ ` " \ or !.
q_dq() {
	if _jt_safe_word "$1"; then
		printf '%s' "$1"
	elif [[ $1 == *[\$\`\"\\!]* || $1 == *$'\n'* ]]; then
		q_sq "$1"
	else
		printf '"%s"' "$1"
	fi
}

# q_arg WORD: for the printed command lines; --flag=VALUE and NAME=VALUE keep the part up to the
# = bare and quote the value.
q_arg() {
	if _jt_safe_word "$1"; then
		printf '%s' "$1"
	elif [[ $1 =~ ^(--[A-Za-z0-9-]+=|[A-Za-z_][A-Za-z0-9_]*=)(.*)$ ]]; then
		local head=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
		printf '%s' "$head"
		q_sq "$value"
	else
		q_sq "$1"
	fi
}

# join_q_dq WORD...: the words as one command string for a remote shell.
join_q_dq() {
	local out="" w
	for w in "$@"; do
		out+="${out:+ }$(q_dq "$w")"
	done
	printf '%s' "$out"
}

# show_cmd CMD...: the "+ cmd" line (stdout in dry-run, where it is the listing; stderr otherwise).
show_cmd() {
	local line="+" w
	for w in "$@"; do
		line+=" $(q_arg "$w")"
	done
	if [[ $DRY_RUN == 1 ]]; then
		printf '%s\n' "$line"
	else
		printf '%s\n' "$line" >&2
	fi
}

# x CMD...: show the command, then run it unless this is a dry run.
x() {
	show_cmd "$@"
	[[ $DRY_RUN == 1 ]] && return 0
	"$@"
}

# now_us: NOW_US = a clock in microseconds (EPOCHREALTIME on bash >= 5, else whole seconds)
now_us() {
	if [[ -n ${EPOCHREALTIME:-} ]]; then
		NOW_US=${EPOCHREALTIME//[!0-9]/}
		NOW_US=$((10#$NOW_US))
	else
		NOW_US=$((SECONDS * 1000000))
	fi
}

# ---------------------------------------------------------------------------------------------
# Accelerator types. Names and runtime versions from Google's "TPU software versions" page
# (https://cloud.google.com/tpu/docs/runtimes: v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
# v5e -> v2-alpha-tpuv5-lite, v4 and older -> tpu-ubuntu2204-base). The size suffix counts
# TensorCores for v2/v3/v4/v5p (2 per chip on v4/v5p, 4 chips per VM) and chips for v5litepod/v6e
# (up to 8 chips on one VM; larger slices are made of 4-chip VMs).

# accel_check TYPE: dies with a one-line message unless TYPE is a TPU accelerator type we know.
accel_check() {
	local t=$1 fam n
	if [[ ! $t =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$ ]]; then
		local hint=""
		case $t in
		v5e-* | v5lite-* | v5lite_pod-*) hint=" (TPU v5e is spelled v5litepod-N, e.g. v5litepod-32)" ;;
		v6-* | trillium-*) hint=" (TPU v6e is spelled v6e-N)" ;;
		esac
		die "unknown accelerator type '$t'; expected v2-N, v3-N, v4-N, v5p-N, v5litepod-N or v6e-N$hint"
	fi
	fam=${BASH_REMATCH[1]}
	n=$((10#${BASH_REMATCH[2]}))
	case $fam in
	v5litepod | v6e)
		case $n in
		1 | 4 | 8 | 16 | 32 | 64 | 128 | 256) ;;
		*) die "unknown accelerator type '$t'; $fam slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips" ;;
		esac
		;;
	*)
		if ((n < 8 || n % 8 != 0)); then
			die "unknown accelerator type '$t'; $fam sizes are multiples of 8 TensorCores (e.g. $fam-8, $fam-32)"
		fi
		;;
	esac
}

# accel_runtime TYPE: the default --runtime-version for TYPE's family.
accel_runtime() {
	case ${1%-*} in
	v6e) printf 'v2-alpha-tpuv6e' ;;
	v5p) printf 'v2-alpha-tpuv5' ;;
	v5litepod) printf 'v2-alpha-tpuv5-lite' ;;
	*) printf 'tpu-ubuntu2204-base' ;;
	esac
}

# accel_workers TYPE: how many TPU VMs (workers, JAX processes) one slice of TYPE has. Used only
# where the slice cannot be asked (dry runs); a real run counts networkEndpoints instead.
accel_workers() {
	local fam=${1%-*} n=$((10#${1##*-}))
	case $fam in
	v5litepod | v6e)
		if ((n <= 8)); then printf '1'; else printf '%d' $((n / 4)); fi
		;;
	*)
		if ((n <= 8)); then printf '1'; else printf '%d' $((n / 8)); fi
		;;
	esac
}
