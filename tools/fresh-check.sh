#!/usr/bin/env bash
# The kiosk's set-up paths on a clean machine (`make fresh-check`, root): a Debian bookworm
# amd64 root made for the purpose (debootstrap minbase plus python3 and make, nothing else),
# entered by chroot in a private mount namespace, where the steps a new user and CI take run on
# a copy of the project. It reports each package the steps install, every command they call
# that nothing installed, and the tests that skipped for want of a tool.
#
#   fresh-check.sh [--quick] [--worktree]
#
#   (default)    .ci/run's install step, make demo, make test (its qemu kernel test must run,
#                not skip), image-test.sh --check-host (the image boot's packages, files, and
#                its qemu machine started paused)
#   --quick      (.ci/run) the same without make test, and one qemu kernel boot instead
#                (tests/qemu/run-in-kernel.sh true)
#   --worktree   copy the work tree's files (tracked and untracked, not ignored); else HEAD,
#                as a fresh clone has it
#   FULL=1       also make image-test in the root (builds and boots the image, ~20 min more)
#
# Env: KIOSK_FRESH_DIR (default build/fresh-check): the base root's tarball (rebuilt weekly),
# apt's and pip's download caches (they change where .debs and wheels come from, never what
# is installed), the last root, each step's log and trace, and report.txt.
# No loop mounts: /proc, /sys and /dev are mounted or bound in, inside a private mount namespace
# that takes every mount with it when the check ends, however it ends.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJECT="$(cd "${HERE}/.." && pwd)"
DIR="${KIOSK_FRESH_DIR:-${PROJECT}/build/fresh-check}"
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
# "Both need only Python 3.11+ and make": on Debian bookworm, python3 (3.11) and make. Not git
# (the project is copied in, as a clone would lay it), not ca-certificates (pip brings its own
# CA bundle; apt uses http), not python3-venv: whatever else is needed, a step must install.
BASE_PACKAGES=(python3 make)
BASE_MAX_AGE_DAYS=7
IN_ROOT=/root/kiosk # the project inside the root; /root/shared beside it, as CI lays it out
ROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
NOT_FOUND_LOG=/var/log/fresh-check-not-found # inside the root, written by bash's handler
# Commands a step tries, finds nowhere, and does without by design ("name: why"). Any other
# command a step calls that nothing installed fails the check.
OPTIONAL_COMMANDS=(
	"nscd: useradd, in a package's postinst, flushes nscd's cache when there is one"
	"sss_cache: useradd likewise flushes SSSD's cache when there is one"
	"lsb_release: pip's vendored distro asks it for the OS name, for pip's user agent"
)
# A skipped test whose reason says a tool or package is absent: a set-up gap, not a property
# of the machine (no /dev/uinput, running as root).
SETUP_SKIP='missing|not installed|apt-get install|is needed|cannot run|impossible'

log() { printf 'fresh-check: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	sed -n '8,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

show_tail() { # LOG
	log "the end of $1:"
	tail -n 40 "$1" | sed 's/^/    /' >&2
}

# The base root, cached as a tarball: debootstrap minbase + python3 + make, apt's lists emptied
# (as Debian's container images ship them), sources for bookworm, -updates and -security.
ensure_base() {
	local tar="${DIR}/base.tar" stamp="${DIR}/base.stamp" want base="${DIR}/base.new" started
	local include
	include="$(IFS=,; echo "${BASE_PACKAGES[*]}")"
	want="debootstrap --variant=minbase --arch=amd64 --include=${include} ${SUITE} ${MIRROR}"
	if [[ -f "${tar}" && "$(cat "${stamp}" 2>/dev/null)" == "${want}" &&
		-z "$(find "${tar}" -mtime +"${BASE_MAX_AGE_DAYS}")" ]]; then
		log "base root: cached ${tar} ($(date -r "${tar}" +%F))"
		return
	fi
	started="$(date +%s)"
	log "base root: ${want}"
	rm -rf --one-file-system "${base}"
	debootstrap --variant=minbase --arch=amd64 --include="${include}" "${SUITE}" "${base}" \
		"${MIRROR}" >"${DIR}/logs/debootstrap.log" 2>&1 || {
		show_tail "${DIR}/logs/debootstrap.log"
		die "debootstrap failed"
	}
	cat >"${base}/etc/apt/sources.list" <<-EOF
		deb ${MIRROR} ${SUITE} main
		deb ${MIRROR} ${SUITE}-updates main
		deb http://security.debian.org/debian-security ${SUITE}-security main
	EOF
	rm -rf "${base}"/var/lib/apt/lists/* "${base}"/var/cache/apt/*.bin "${base}"/var/cache/apt/archives/*.deb
	tar -C "${base}" -cf "${tar}.tmp" .
	mv "${tar}.tmp" "${tar}"
	echo "${want}" >"${stamp}"
	rm -rf --one-file-system "${base}"
	log "base root built in $(($(date +%s) - started)) s"
}

# A fresh root from the base, with the project (HEAD, or the work tree) and shared/ beside it.
make_root() {
	local mounted
	mounted="$(findmnt -rn -o TARGET | awk -v r="${ROOT}" 'index($0, r) == 1')"
	[[ -z "${mounted}" ]] || die "still mounted under ${ROOT}: ${mounted}"
	rm -rf --one-file-system "${ROOT}"
	mkdir -p "${ROOT}"
	tar -C "${ROOT}" -xf "${DIR}/base.tar"
	mkdir -p "${ROOT}${IN_ROOT}"
	if [[ "${WORKTREE}" -eq 1 ]]; then
		(cd "${PROJECT}" && git ls-files -z -co --exclude-standard |
			tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "${ROOT}${IN_ROOT}" -xf -
		SOURCE="the work tree of ${PROJECT} ($(git -C "${PROJECT}" rev-parse --short HEAD) + changes)"
	else
		git -C "${PROJECT}" archive HEAD | tar -C "${ROOT}${IN_ROOT}" -xf -
		SOURCE="HEAD $(git -C "${PROJECT}" rev-parse --short HEAD) of ${PROJECT}"
	fi
	if [[ -d "${PROJECT}/../shared" ]]; then cp -a "${PROJECT}/../shared" "${ROOT}/root/shared"; fi
	# The network comes from the host, as resolv.conf does: a network that inspects TLS needs
	# its local CA, which ca-certificates (when a step installs it) adds to the root's store.
	LOCAL_CAS=0
	if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
		mkdir -p "${ROOT}/usr/local/share/ca-certificates"
		cp /usr/local/share/ca-certificates/*.crt "${ROOT}/usr/local/share/ca-certificates/"
		LOCAL_CAS="$(find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' | wc -l)"
	fi
	# bash's hook for a command it finds nowhere (it never calls execve for one, so the trace
	# cannot see it); every non-interactive bash reads BASH_ENV.
	cat >"${ROOT}/root/.fresh-check-bash-env" <<-EOF
		command_not_found_handle() {
		    printf '%s\t%s\n' "\$1" "\${BASH_SOURCE[1]:-bash}" >>${NOT_FOUND_LOG} 2>/dev/null
		    printf 'bash: %s: command not found\n' "\$1" >&2
		    return 127
		}
	EOF
}

mount_root() {
	# The root a mount point of its own, as / is on a machine: else `unshare -m` inside (the
	# storage-fault tests) cannot make / private.
	mount --bind "${ROOT}" "${ROOT}"
	MOUNTED=1
	mount -t proc proc "${ROOT}/proc"
	mount --rbind /sys "${ROOT}/sys"
	mount --make-rslave "${ROOT}/sys"
	mount --rbind /dev "${ROOT}/dev"
	mount --make-rslave "${ROOT}/dev"
	cp -L /etc/resolv.conf "${ROOT}/etc/resolv.conf"
	mkdir -p "${DIR}/cache/apt/partial" "${DIR}/cache/pip" "${ROOT}/root/.cache/pip"
	mount --bind "${DIR}/cache/apt" "${ROOT}/var/cache/apt/archives"
	mount --bind "${DIR}/cache/pip" "${ROOT}/root/.cache/pip"
	MOUNTED=1
}

unmount_root() {
	[[ "${MOUNTED:-0}" -eq 1 ]] || return 0
	local target
	for target in root/.cache/pip var/cache/apt/archives dev sys proc ""; do
		umount -R "${ROOT}/${target}" 2>/dev/null || umount -R -l "${ROOT}/${target}" 2>/dev/null || true
	done
	MOUNTED=0
}

installed_packages() {
	# shellcheck disable=SC2016  # dpkg-query's own ${field} syntax
	chroot "${ROOT}" dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' |
		awk '$1 == "ii" { print $2 }' | sort
}

# Commands that a step tried to execute (execve) and found nowhere: every attempt by a process
# for that name ended in ENOENT and none succeeded. From strace -f output.
missing_from_trace() { # TRACE
	awk '
	function note(pid, result,   name, path) {
		path = cur[pid]
		if (path == "") return
		name = path; sub(/.*\//, "", name)
		if (result ~ /^= 0/) ok[pid SUBSEP name] = 1
		else if (result ~ /ENOENT/) { tried[pid SUBSEP name] = 1; where[name] = path }
		cur[pid] = ""
	}
	/ execve\("/ {
		pid = $1
		path = $0; sub(/^[^"]*"/, "", path); sub(/".*/, "", path)
		cur[pid] = path
		if ($0 ~ /<unfinished \.\.\.>$/) next
		result = $0; sub(/.*\) += /, "= ", result)
		note(pid, result); next
	}
	/<\.\.\. execve resumed>/ {
		result = $0; sub(/.*\) += /, "= ", result)
		note($1, result)
	}
	END {
		for (key in tried) if (!(key in ok)) { split(key, k, SUBSEP); missing[k[2]]++ }
		for (name in missing) print name
	}' "$1" | sort -u
}

optional_reason() { # NAME -> why it may be missing, or nothing
	local entry
	for entry in "${OPTIONAL_COMMANDS[@]}"; do
		if [[ "${entry%%:*}" == "$1" ]]; then
			echo "${entry#*: }"
			return
		fi
	done
}

STEP_LINES=()
ALL_ADDED=()
FAILED=0

run_step() { # NAME COMMAND
	local name="$1" command="$2" slug before after added started elapsed rc=0 missing cmd why
	slug="$(tr -c 'a-z0-9\n' '-' <<<"${name}")"
	local out="${DIR}/logs/${slug}.log" trace="${DIR}/logs/${slug}.trace"
	before="$(installed_packages)"
	rm -f "${ROOT}${NOT_FOUND_LOG}"
	log "step: ${name} (${command}); log in ${out}"
	started="$(date +%s)"
	strace -f --seccomp-bpf -qq -s 512 -e trace=execve -e signal=none -o "${trace}" \
		chroot "${ROOT}" /usr/bin/env -i HOME=/root PATH="${ROOT_PATH}" TERM=dumb \
		BASH_ENV=/root/.fresh-check-bash-env \
		/bin/bash -c "cd ${IN_ROOT} && ${command}" </dev/null >"${out}" 2>&1 || rc=$?
	elapsed=$(($(date +%s) - started))
	after="$(installed_packages)"
	added="$(comm -13 <(echo "${before}") <(echo "${after}") | tr '\n' ' ')"
	# shellcheck disable=SC2206  # one package a word
	ALL_ADDED+=(${added})
	STEP_LINES+=("$(printf '%-34s %5d s  %-6s %3d packages installed' "${name}" "${elapsed}" \
		"$([[ "${rc}" -eq 0 ]] && echo ok || echo "rc=${rc}")" "$(wc -w <<<"${added}")")")
	if [[ -n "${added}" ]]; then STEP_LINES+=("$(fold -s -w 88 <<<"${added}" | sed 's/^/    /')"); fi
	missing="$( (missing_from_trace "${trace}"; cut -f1 "${ROOT}${NOT_FOUND_LOG}" 2>/dev/null) | sort -u)"
	for cmd in ${missing}; do
		why="$(optional_reason "${cmd}")"
		if [[ -n "${why}" ]]; then
			STEP_LINES+=("    called, installed by nothing, tolerated: ${cmd} (${why})")
		else
			STEP_LINES+=("    called, installed by nothing: ${cmd} ($(grep -c "execve(\"[^\"]*/${cmd}\"" "${trace}") attempts)")
			FAILED=1
		fi
	done
	if [[ "${rc}" -ne 0 ]]; then
		show_tail "${out}"
		FAILED=1
	fi
	log "step: ${name}: $([[ "${rc}" -eq 0 ]] && echo ok || echo "failed (${rc})") in ${elapsed} s"
	return "${rc}"
}

# pytest's "SKIPPED [n] file:line: reason" lines; a reason that names a missing tool fails.
check_skips() { # LOG
	local skips
	skips="$(grep -aE '^SKIPPED \[' "$1" || true)"
	[[ -n "${skips}" ]] || {
		STEP_LINES+=("    tests skipped: none")
		return
	}
	while IFS= read -r line; do
		if grep -qiE "${SETUP_SKIP}" <<<"${line}"; then
			STEP_LINES+=("    skipped for want of a tool: ${line#SKIPPED }")
			FAILED=1
		else
			STEP_LINES+=("    skipped (not a set-up gap): ${line#SKIPPED }")
		fi
	done <<<"${skips}"
	grep -aqE 'test_uinput_in_qemu.py' <<<"${skips}" && {
		STEP_LINES+=("    the qemu kernel test did not run")
		FAILED=1
	}
	return 0
}

report() {
	local total="$1" base_count pip_conf="" file
	base_count="$(tar -tf "${DIR}/base.tar" ./var/lib/dpkg/status >/dev/null 2>&1 &&
		tar -xOf "${DIR}/base.tar" ./var/lib/dpkg/status | grep -c '^Status: install ok installed')"
	for file in etc/pip.conf etc/xdg/pip/pip.conf root/.config/pip/pip.conf root/.pip/pip.conf; do
		if [[ -e "${ROOT}/${file}" ]]; then pip_conf+="/${file} "; fi
	done
	{
		echo "fresh-check report ($(date -u '+%F %H:%M UTC'), mode ${MODE})"
		echo "project: ${SOURCE}"
		echo "root: debootstrap --variant=minbase bookworm amd64 + ${BASE_PACKAGES[*]}: ${base_count} packages,"
		echo "      apt lists empty; apt: $(grep -E '^deb ' "${ROOT}/etc/apt/sources.list" |
			awk '{ printf "%s%s %s", sep, $2, $3; sep = ", " }')"
		echo "      pip: PyPI (no pip.conf${pip_conf:+ except ${pip_conf}}, no PIP_* variables); entered by chroot, env -i"
		echo "      from the host: resolv.conf, ${LOCAL_CAS} local CA certificates (/usr/local/share/ca-certificates)"
		echo
		printf '%s\n' "${STEP_LINES[@]}"
		echo
		echo "packages the steps installed, in all: ${#ALL_ADDED[@]}"
		echo "  asked for in tools/host-packages.txt: $(printf '%s\n' "${ALL_ADDED[@]}" |
			grep -xF -f <(bash "${HERE}/host-packages.sh" list all) | tr '\n' ' ')"
		echo "commands called that nothing installed: $(grep -c 'installed by nothing:' \
			<(printf '%s\n' "${STEP_LINES[@]}") || true)"
		echo "total ${total} s"
		if [[ "${FAILED}" -eq 0 ]]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
	} | tee "${DIR}/report.txt"
}

main() {
	local quick=0 started args=("$@")
	WORKTREE=0
	while [[ $# -gt 0 ]]; do
		case "$1" in
		--quick) quick=1 ;;
		--worktree) WORKTREE=1 ;;
		*) usage ;;
		esac
		shift
	done
	[[ "$(id -u)" -eq 0 ]] || die "run as root (debootstrap, chroot, mounts)"
	if [[ "${KIOSK_FRESH_NAMESPACE:-}" != 1 ]]; then
		bash "${HERE}/host-packages.sh" install fresh-check
		# A private mount namespace: no mount made here is seen outside, and all go with it.
		exec unshare --mount --propagation private env KIOSK_FRESH_NAMESPACE=1 \
			bash "${BASH_SOURCE[0]}" "${args[@]}"
	fi
	started="$(date +%s)"
	MODE=full
	if [[ "${quick}" -eq 1 ]]; then MODE=quick; fi
	if [[ "${FULL:-0}" == 1 ]]; then MODE+=" + make image-test"; fi
	mkdir -p "${DIR}/logs"
	DIR="$(cd "${DIR}" && pwd)"
	exec 8>"${DIR}/.lock"
	flock -n 8 || die "another fresh-check is using ${DIR}"
	ROOT="${DIR}/root"
	rm -f "${DIR}"/logs/* "${DIR}/report.txt"
	ensure_base
	make_root
	trap unmount_root EXIT
	mount_root

	# Each step runs even when an earlier one failed, so one report shows every gap.
	run_step ".ci/run --install-only" "bash .ci/run --install-only" || true
	run_step "make demo" "make demo" || true
	if [[ "${quick}" -eq 1 ]]; then
		run_step "qemu kernel boot" "tests/qemu/run-in-kernel.sh true" || true
	else
		run_step "make test" "make test" || true
		check_skips "${DIR}/logs/make-test.log"
	fi
	run_step "image-test.sh --check-host" "bash image-build/image-test.sh --check-host" || true
	if [[ "${FULL:-0}" == 1 ]]; then
		run_step "make image-test" "make image-test" || true
	fi
	unmount_root
	report "$(($(date +%s) - started))"
	[[ "${FAILED}" -eq 0 ]] || die "the set-up paths have gaps (report in ${DIR}/report.txt)"
}

main "$@"
