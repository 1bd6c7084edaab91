#!/usr/bin/env bash
# Installs or checks the host packages the kiosk's set-up steps need, as declared in
# tools/host-packages.txt: per package (dpkg's status) and per file or command it must provide.
#
#   host-packages.sh install GROUP...   install what is missing (root), say what was installed
#   host-packages.sh check GROUP...     report what is missing; exit 1 if anything is
#   host-packages.sh list GROUP...      the packages, one a line
#
# GROUP is a group of the list (dev tests kernel-tests image-build image-boot fresh-check) or
# "all". Debian's archive only (apt-get, --no-install-recommends: what a step needs is listed).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LIST="${HERE}/host-packages.txt"
# Commands in sbin count for a non-root caller too.
export PATH="${PATH}:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf 'host-packages: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# The list's lines for the groups asked: "package item..." (a package may repeat across groups).
select_lines() {
	local groups=" $* "
	[[ "${groups}" == *" all "* ]] && groups=" $(awk '!/^#/ && NF { print $1 }' "${LIST}" | sort -u | tr '\n' ' ') "
	local group
	for group in ${groups}; do
		grep -qE "^${group}[[:space:]]" "${LIST}" || die "no group ${group} in ${LIST}"
	done
	awk -v groups="${groups}" '!/^#/ && NF && index(groups, " " $1 " ") {
		line = $2; for (i = 3; i <= NF; i++) line = line " " $i; print line }' "${LIST}"
}

installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }
known_to_apt() { apt-cache show --no-all-versions "$1" >/dev/null 2>&1; }

# Prints "package: what is wrong" for each problem; returns 1 if there was any.
problems() {
	local package items item bad=0
	while read -r package items; do
		if [[ "${items}" == "@download" ]]; then
			known_to_apt "${package}" || {
				echo "${package}: unknown to apt's lists (apt-get update)"
				bad=1
			}
			continue
		fi
		installed "${package}" || {
			echo "${package}: not installed"
			bad=1
		}
		for item in ${items}; do
			if [[ "${item}" == /* ]]; then
				[[ -e "${item}" ]] || {
					echo "${package}: no file ${item}"
					bad=1
				}
			else
				command -v "${item}" >/dev/null || {
					echo "${package}: no command ${item}"
					bad=1
				}
			fi
		done
	done < <(select_lines "$@" | sort -u)
	return "${bad}"
}

package_versions() { dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\n' 2>/dev/null |
	awk '$1 == "ii" { print $2 " " $3 }' | sort; }

apt_quiet() { # apt-get ARGS...: its output only if it fails
	local out
	out="$(mktemp)"
	if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@" >"${out}" 2>&1; then
		cat "${out}" >&2
		rm -f "${out}"
		return 1
	fi
	rm -f "${out}"
}

install_groups() {
	local report wanted=() reinstall=() line package before after
	report="$(problems "$@")" && {
		log "$(select_lines "$@" | sort -u | wc -l) packages for $*: all present, every file and command checked"
		return 0
	}
	printf '%s\n' "${report}" | sed 's/^/host-packages: missing /' >&2
	[[ "$(id -u)" -eq 0 ]] || die "run as root, or: sudo apt-get install --no-install-recommends \
$(printf '%s\n' "${report}" | cut -d: -f1 | sort -u | tr '\n' ' ')"
	while read -r line; do
		package="${line%%:*}"
		[[ " ${wanted[*]} ${reinstall[*]} " == *" ${package} "* ]] && continue
		if [[ "${line}" == *"unknown to apt"* ]]; then
			continue # only the lists are missing: the update below
		elif installed "${package}"; then
			reinstall+=("${package}") # installed, yet a file is gone
		else
			wanted+=("${package}")
		fi
	done <<<"${report}"
	before="$(package_versions)"
	log "apt-get update"
	apt_quiet update
	if [[ ${#wanted[@]} -gt 0 ]]; then
		log "apt-get install --no-install-recommends ${wanted[*]}"
		apt_quiet install -y --no-install-recommends "${wanted[@]}"
	fi
	if [[ ${#reinstall[@]} -gt 0 ]]; then
		log "apt-get install --reinstall ${reinstall[*]}"
		apt_quiet install -y --no-install-recommends --reinstall "${reinstall[@]}"
		log "reinstalled ${reinstall[*]} (a file they provide was gone)"
	fi
	after="$(package_versions)"
	comm -13 <(printf '%s\n' "${before}") <(printf '%s\n' "${after}") | while read -r package line; do
		if [[ " ${wanted[*]} ${reinstall[*]} " == *" ${package} "* ]]; then
			log "installed ${package} ${line}"
		else
			log "installed ${package} ${line} (a dependency)"
		fi
	done
	report="$(problems "$@")" || {
		printf '%s\n' "${report}" | sed 's/^/host-packages: still missing /' >&2
		die "the install did not provide everything ${LIST##*/} asks for"
	}
	log "$(select_lines "$@" | sort -u | wc -l) packages for $*: all present now"
}

main() {
	[[ $# -ge 2 ]] || {
		sed -n '5,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
		exit 2
	}
	command -v dpkg-query >/dev/null || die "not a Debian system (no dpkg-query)"
	local action="$1"
	shift
	case "${action}" in
	install) install_groups "$@" ;;
	check)
		local report
		report="$(problems "$@")" || {
			printf '%s\n' "${report}" | sed 's/^/host-packages: missing /' >&2
			exit 1
		}
		log "$(select_lines "$@" | sort -u | wc -l) packages for $*: all present, every file and command checked"
		;;
	list) select_lines "$@" | awk '{ print $1 }' | sort -u ;;
	*) die "unknown action ${action} (install, check, list)" ;;
	esac
}

main "$@"
