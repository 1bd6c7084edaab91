"""First-boot provisioning from a fake boot partition into a fake /etc/kiosk."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kiosk import provision as provisioning
from kiosk.config import check_config, load_config
from kiosk.provision import ERROR_FILE, ProvisionFailed, provision, run_provision

SOURCE = """\
# dropped on the boot partition by the technician
[kiosk]
terminal_id = "VM-0042"
state_dir = "/var/lib/kiosk"

[alipay]
gateway = "https://globalmapi.alipay.com/gateway.do"
partner = "2088101122334455"
private_key_file = "merchant_private_key.pem"   # beside this file
alipay_public_key_file = 'alipay_public_key.pem'
currency = "USD"

[merchant]
secondary_merchant_id = "M-001"
store_id = "S-042"

[sale]
price = "1.50"
item = "coffee"

[scanner]
driver = "fake"

[vend]
driver = "fake"
"""


@pytest.fixture(scope="module")
def pems() -> tuple[bytes, bytes]:
    merchant = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = merchant.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = alipay.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.fixture
def boot(tmp_path: Path, pems: tuple[bytes, bytes]) -> Path:
    """A boot partition folder as FAT shows it: every file 0755-ish, no safe modes."""
    folder = tmp_path / "boot"
    folder.mkdir()
    (folder / "kiosk.toml").write_text(SOURCE)
    (folder / "merchant_private_key.pem").write_bytes(pems[0])
    (folder / "alipay_public_key.pem").write_bytes(pems[1])
    for path in folder.iterdir():
        path.chmod(0o755)
    return folder


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    return tmp_path / "etc" / "kiosk"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_good_config_is_installed_with_keys_pointing_at_etc(boot: Path, etc: Path) -> None:
    report = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert report.status == "installed"
    config = load_config(etc / "kiosk.toml")
    assert config.alipay.private_key_file == etc / "keys/merchant_private_key.pem"
    assert config.alipay.alipay_public_key_file == etc / "keys/alipay_public_key.pem"
    assert config.kiosk.terminal_id == "VM-0042"


def test_installed_config_keeps_the_technicians_comments(boot: Path, etc: Path) -> None:
    provision(boot / "kiosk.toml", etc, owner=None, group=None)

    text = (etc / "kiosk.toml").read_text()
    assert text.startswith("# dropped on the boot partition by the technician\n")
    assert f'private_key_file = "{etc}/keys/merchant_private_key.pem"   # beside this file' in text
    assert len(text.splitlines()) == len(SOURCE.splitlines())


def test_installed_files_get_safe_modes_even_from_fat(boot: Path, etc: Path) -> None:
    (boot / "merchant_private_key.pem").chmod(0o666)

    provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert mode_of(etc / "keys") == 0o750
    assert mode_of(etc / "keys/merchant_private_key.pem") == 0o600
    assert mode_of(etc / "keys/alipay_public_key.pem") == 0o640
    assert mode_of(etc / "kiosk.toml") == 0o640
    assert check_config(etc / "kiosk.toml")[0] is not None  # the full check, modes included


def test_modes_do_not_depend_on_the_umask(boot: Path, etc: Path) -> None:
    old = os.umask(0o077)  # what the provisioning unit runs with
    try:
        provision(boot / "kiosk.toml", etc, owner=None, group=None)
    finally:
        os.umask(old)

    assert mode_of(etc) == 0o755
    assert mode_of(etc / "keys") == 0o750
    assert mode_of(etc / "kiosk.toml") == 0o640


def test_secrets_are_removed_from_the_boot_partition(boot: Path, etc: Path) -> None:
    report = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert not (boot / "merchant_private_key.pem").exists()
    assert report.removed == [boot / "merchant_private_key.pem"]
    assert (boot / "alipay_public_key.pem").exists()  # public: no need to remove


def test_source_is_renamed_so_the_next_boot_does_nothing(boot: Path, etc: Path) -> None:
    provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert not (boot / "kiosk.toml").exists()
    assert (boot / "kiosk.toml.provisioned").read_text() == SOURCE


def test_record_lists_what_was_done_without_key_material(
    boot: Path, etc: Path, pems: tuple[bytes, bytes]
) -> None:
    provision(boot / "kiosk.toml", etc, owner=None, group=None)

    raw = (etc / "provisioned.json").read_text()
    record = json.loads(raw)
    assert record["source_sha256"] == hashlib.sha256(SOURCE.encode()).hexdigest()
    assert record["config_sha256"] == hashlib.sha256((etc / "kiosk.toml").read_bytes()).hexdigest()
    assert {f["key"] for f in record["files"]} == {
        "config",
        "private_key_file",
        "alipay_public_key_file",
    }
    assert record["provisioned_at"].endswith("+00:00")
    assert "BEGIN" not in raw
    assert pems[0].decode().splitlines()[1] not in raw


def test_owner_and_group_are_applied(boot: Path, etc: Path) -> None:
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name

    provision(boot / "kiosk.toml", etc, owner=user, group=group)

    secret = (etc / "keys/merchant_private_key.pem").stat()
    assert (secret.st_uid, secret.st_gid) == (os.getuid(), os.getgid())
    assert (etc / "keys").stat().st_gid == os.getgid()


def test_unknown_service_user_fails_before_installing_but_after_the_secrets_left(
    boot: Path, etc: Path, pems: tuple[bytes, bytes]
) -> None:
    with pytest.raises(provisioning.ProvisionError, match="no-such-kiosk-user"):
        provision(boot / "kiosk.toml", etc, owner="no-such-kiosk-user", group=None)

    assert not (etc / "kiosk.toml").exists() and not (etc / "keys").exists()
    assert not (boot / "merchant_private_key.pem").exists()
    assert (etc / "quarantine/merchant_private_key.pem").read_bytes() == pems[0]


def test_bad_config_writes_crlf_error_file_and_installs_nothing(boot: Path, etc: Path) -> None:
    text = SOURCE.replace('partner = "2088101122334455"', 'partner = "123"')
    (boot / "kiosk.toml").write_text(text)

    with pytest.raises(ProvisionFailed) as raised:
        provision(boot / "kiosk.toml", etc, owner=None, group=None)

    error_file = boot / ERROR_FILE
    assert raised.value.error_file == error_file
    raw = error_file.read_bytes()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    partner_line = text.splitlines().index('partner = "123"') + 1
    assert f"kiosk.toml:{partner_line}:1: error: alipay.partner '123'" in raw.decode()
    assert "What to do" in raw.decode()
    assert not (etc / "kiosk.toml").exists() and not (etc / "keys").exists()
    assert (boot / "kiosk.toml").read_text() == text
    assert not (boot / "merchant_private_key.pem").exists()  # quarantined, see test_quarantine


def test_missing_key_file_on_the_boot_partition_is_a_config_problem(boot: Path, etc: Path) -> None:
    (boot / "alipay_public_key.pem").unlink()

    with pytest.raises(ProvisionFailed) as raised:
        provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert any("alipay_public_key_file" in p.message for p in raised.value.problems)
    assert not (etc / "kiosk.toml").exists()


def test_successful_run_removes_an_old_error_file(boot: Path, etc: Path) -> None:
    (boot / ERROR_FILE).write_text("old\r\n")

    provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert not (boot / ERROR_FILE).exists()


def test_second_run_without_source_does_nothing_and_says_so(boot: Path, etc: Path) -> None:
    provision(boot / "kiosk.toml", etc, owner=None, group=None)
    installed = (etc / "kiosk.toml").read_bytes()

    report = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert report.status == "nothing_to_do"
    assert "nothing to do" in str(report)
    assert (etc / "kiosk.toml").read_bytes() == installed


def test_same_config_again_without_its_keys_is_recognised(boot: Path, etc: Path) -> None:
    provision(boot / "kiosk.toml", etc, owner=None, group=None)
    (boot / "kiosk.toml").write_text(SOURCE)  # copied back; the private key is gone from boot

    report = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert report.status == "already_installed"
    assert not (boot / ERROR_FILE).exists()
    assert (boot / "kiosk.toml.provisioned").exists() and not (boot / "kiosk.toml").exists()


def test_same_config_again_with_its_keys_removes_the_secret_again(
    boot: Path, etc: Path, pems: tuple[bytes, bytes]
) -> None:
    provision(boot / "kiosk.toml", etc, owner=None, group=None)
    (boot / "kiosk.toml").write_text(SOURCE)
    (boot / "merchant_private_key.pem").write_bytes(pems[0])

    report = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert report.status == "already_installed"
    assert not (boot / "merchant_private_key.pem").exists()


def test_bad_new_config_leaves_the_installed_one_alone(boot: Path, etc: Path) -> None:
    provision(boot / "kiosk.toml", etc, owner=None, group=None)
    installed = (etc / "kiosk.toml").read_bytes()
    (boot / "kiosk.toml").write_text(SOURCE.replace('currency = "USD"', 'currency = "usd"'))

    with pytest.raises(ProvisionFailed):
        provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert (etc / "kiosk.toml").read_bytes() == installed
    assert (boot / ERROR_FILE).exists()


def test_md5_key_is_installed_as_a_secret_and_removed_from_boot(boot: Path, etc: Path) -> None:
    (boot / "md5.key").write_text("0123456789abcdef0123456789abcdef\n")
    text = SOURCE.replace(
        'private_key_file = "merchant_private_key.pem"   # beside this file\n'
        "alipay_public_key_file = 'alipay_public_key.pem'\n",
        'sign_type = "MD5"\nmd5_key_file = "md5.key"\n',
    )
    (boot / "kiosk.toml").write_text(text)

    provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert mode_of(etc / "keys/md5.key") == 0o600
    assert not (boot / "md5.key").exists()
    assert load_config(etc / "kiosk.toml").alipay.md5_key_file == etc / "keys/md5.key"


def test_unused_md5_key_on_boot_is_installed_and_removed_too(boot: Path, etc: Path) -> None:
    (boot / "md5.key").write_text("0123456789abcdef0123456789abcdef\n")
    (boot / "kiosk.toml").write_text(
        SOURCE.replace('currency = "USD"', 'currency = "USD"\nmd5_key_file = "md5.key"')
    )

    report = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert not (boot / "md5.key").exists()
    assert mode_of(etc / "keys/md5.key") == 0o600
    assert [p.warning for p in report.warnings] == [True]


def test_secret_outside_the_boot_folder_is_left_in_place(
    boot: Path, etc: Path, tmp_path: Path, pems: tuple[bytes, bytes]
) -> None:
    elsewhere = tmp_path / "elsewhere.pem"
    elsewhere.write_bytes(pems[0])
    (boot / "kiosk.toml").write_text(SOURCE.replace('"merchant_private_key.pem"', f'"{elsewhere}"'))

    report = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert elsewhere.exists()
    assert report.left_in_place == [elsewhere]
    assert (etc / "keys/merchant_private_key.pem").read_bytes() == pems[0]


def test_run_provision_exit_codes(
    boot: Path, etc: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # not root: no chown to user kiosk
    (boot / "kiosk.toml").write_text(SOURCE.replace("VM-0042", "VM 0042"))
    assert run_provision(boot / "kiosk.toml", etc) == 2
    assert "kiosk.toml:3:1: error: " in capsys.readouterr().err

    (boot / "kiosk.toml").write_text(SOURCE)
    assert run_provision(boot / "kiosk.toml", etc) == 0
    assert "installed" in capsys.readouterr().out
    assert run_provision(boot / "kiosk.toml", etc) == 0


def test_config_written_on_windows_keeps_its_crlf_lines(boot: Path, etc: Path) -> None:
    (boot / "kiosk.toml").write_bytes(SOURCE.replace("\n", "\r\n").encode())

    provision(boot / "kiosk.toml", etc, owner=None, group=None)

    raw = (etc / "kiosk.toml").read_bytes()
    assert raw.count(b"\r\n") == SOURCE.count("\n")
    assert load_config(etc / "kiosk.toml").alipay.private_key_file == (
        etc / "keys/merchant_private_key.pem"
    )


def test_ca_bundle_beside_the_config_is_installed_and_kept_on_boot(boot: Path, etc: Path) -> None:
    (boot / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (boot / "kiosk.toml").write_text(
        SOURCE.replace('currency = "USD"', 'currency = "USD"\nca_bundle = "ca.pem"')
    )

    provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert load_config(etc / "kiosk.toml").alipay.ca_bundle == str(etc / "keys/ca_bundle.pem")
    assert (boot / "ca.pem").exists()


# --- secrets off the card, whatever happens ---------------------------------------------------


def test_wipe_overwrites_the_file_where_it_lies_before_unlinking(tmp_path: Path) -> None:
    secret = tmp_path / "merchant_private_key.pem"
    secret.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 1000)
    same_inode = tmp_path / "link"
    os.link(secret, same_inode)  # sees the blocks the file owns, after the unlink too

    provisioning.wipe_file(secret)

    assert not secret.exists()
    block = os.statvfs(tmp_path).f_bsize
    assert same_inode.read_bytes() == bytes(block)  # zeros to the end of the last block


def test_a_bad_config_moves_its_secrets_into_a_root_only_quarantine(
    boot: Path, etc: Path, pems: tuple[bytes, bytes]
) -> None:
    (boot / "kiosk.toml").write_text(SOURCE.replace("2088101122334455", "123"))

    with pytest.raises(ProvisionFailed) as raised:
        provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert raised.value.moved == ["merchant_private_key.pem"]
    assert not (boot / "merchant_private_key.pem").exists()
    assert (boot / "alipay_public_key.pem").exists()  # public: stays for the technician
    assert mode_of(etc / "quarantine") == 0o700
    assert (etc / "quarantine/merchant_private_key.pem").read_bytes() == pems[0]
    assert mode_of(etc / "quarantine/merchant_private_key.pem") == 0o600
    error = (boot / ERROR_FILE).read_text()
    assert "kept on the kiosk (root only): merchant_private_key.pem" in error
    assert "BEGIN" not in error


def test_the_fixed_config_uses_the_quarantined_key_then_wipes_the_quarantine(
    boot: Path, etc: Path, pems: tuple[bytes, bytes]
) -> None:
    (boot / "kiosk.toml").write_text(SOURCE.replace("2088101122334455", "123"))
    with pytest.raises(ProvisionFailed):
        provision(boot / "kiosk.toml", etc, owner=None, group=None)
    (boot / "kiosk.toml").write_text(SOURCE)  # fixed; the key is not copied again

    report = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert report.status == "installed"
    assert (etc / "keys/merchant_private_key.pem").read_bytes() == pems[0]
    assert list((etc / "quarantine").iterdir()) == []
    assert not (boot / ERROR_FILE).exists()


def test_a_new_copy_on_the_card_replaces_the_quarantined_one(
    boot: Path, etc: Path, pems: tuple[bytes, bytes]
) -> None:
    (boot / "merchant_private_key.pem").write_bytes(b"not a key\n")
    (boot / "kiosk.toml").write_text(SOURCE)
    with pytest.raises(ProvisionFailed):
        provision(boot / "kiosk.toml", etc, owner=None, group=None)
    (boot / "merchant_private_key.pem").write_bytes(pems[0])

    provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert (etc / "keys/merchant_private_key.pem").read_bytes() == pems[0]


def test_quarantined_files_the_good_config_does_not_use_are_wiped(boot: Path, etc: Path) -> None:
    (etc / "quarantine").mkdir(parents=True)
    (etc / "quarantine/old_merchant_key.pem").write_text("an earlier drop's key\n")

    provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert list((etc / "quarantine").iterdir()) == []


def test_a_private_key_under_any_name_is_taken_off_the_card(
    boot: Path, etc: Path, pems: tuple[bytes, bytes]
) -> None:
    (boot / "backup-of-the-key.txt").write_bytes(pems[0])  # named by no config key

    report = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert not (boot / "backup-of-the-key.txt").exists()
    assert boot / "backup-of-the-key.txt" in report.removed
    assert not (etc / "quarantine/backup-of-the-key.txt").exists()  # wiped after the install


def test_secrets_of_a_config_that_is_not_even_toml_are_taken_off(
    boot: Path, etc: Path, pems: tuple[bytes, bytes]
) -> None:
    (boot / "md5.key").write_text("0123456789abcdef0123456789abcdef\n")
    broken = SOURCE.replace('currency = "USD"', 'currency = "USD\nmd5_key_file = "md5.key"')
    (boot / "kiosk.toml").write_text(broken)

    with pytest.raises(ProvisionFailed) as raised:
        provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert "not valid TOML" in raised.value.problems[0].message
    assert not (boot / "md5.key").exists() and not (boot / "merchant_private_key.pem").exists()
    assert sorted(raised.value.moved) == ["md5.key", "merchant_private_key.pem"]


def test_a_config_holding_a_private_key_is_taken_off_itself(
    boot: Path, etc: Path, pems: tuple[bytes, bytes]
) -> None:
    (boot / "kiosk.toml").write_text(SOURCE + "\n# " + pems[0].decode().replace("\n", "\n# "))

    with pytest.raises(ProvisionFailed) as raised:
        provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert "the config holds a private key" in raised.value.problems[0].message
    assert not (boot / "kiosk.toml").exists()
    assert (boot / ERROR_FILE).exists()


# --- re-provisioning without an operator key ---------------------------------------------------


def test_the_same_config_with_a_new_private_key_rotates_the_key(boot: Path, etc: Path) -> None:
    provision(boot / "kiosk.toml", etc, owner=None, group=None)
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    new_pem = new_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (boot / "kiosk.toml.provisioned").rename(boot / "kiosk.toml")
    (boot / "merchant_private_key.pem").write_bytes(new_pem)

    report = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert report.status == "installed"
    assert (etc / "keys/merchant_private_key.pem").read_bytes() == new_pem
    assert not (boot / "merchant_private_key.pem").exists()


def test_a_changed_config_is_refused_once_provisioned(boot: Path, etc: Path) -> None:
    provision(boot / "kiosk.toml", etc, owner=None, group=None)
    installed = (etc / "kiosk.toml").read_bytes()
    diverted = SOURCE.replace("2088101122334455", "2088999999999999")
    (boot / "kiosk.toml").write_text(diverted)

    with pytest.raises(ProvisionFailed) as raised:
        provision(boot / "kiosk.toml", etc, owner=None, group=None)

    message = raised.value.problems[0].message
    assert "this kiosk.toml differs from that one" in message
    assert "takes only the same kiosk.toml again" in message
    assert "--replace-config" in raised.value.problems[0].hint
    assert (etc / "kiosk.toml").read_bytes() == installed
    assert "differs from that one" in (boot / ERROR_FILE).read_text()


def test_a_changed_alipay_public_key_is_refused_once_provisioned(
    boot: Path, etc: Path, pems: tuple[bytes, bytes]
) -> None:
    provision(boot / "kiosk.toml", etc, owner=None, group=None)
    (boot / "kiosk.toml.provisioned").rename(boot / "kiosk.toml")
    fake = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (boot / "alipay_public_key.pem").write_bytes(
        fake.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )

    with pytest.raises(ProvisionFailed) as raised:
        provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert raised.value.problems[0].message.startswith(
        "alipay_public_key_file alipay_public_key.pem differs from the installed "
        "alipay_public_key.pem"
    )
    assert (etc / "keys/alipay_public_key.pem").read_bytes() == pems[1]


def test_replace_config_installs_a_changed_config(boot: Path, etc: Path) -> None:
    provision(boot / "kiosk.toml", etc, owner=None, group=None)
    (boot / "kiosk.toml").write_text(SOURCE.replace('price = "1.50"', 'price = "2.00"'))
    (boot / "merchant_private_key.pem").write_bytes(
        (etc / "keys/merchant_private_key.pem").read_bytes()
    )

    report = provision(boot / "kiosk.toml", etc, owner=None, group=None, replace_config=True)

    assert report.status == "installed"
    assert str(load_config(etc / "kiosk.toml").sale.price) == "2.00"


def test_kiosk_keygen_txt_makes_the_key_pair_and_never_replaces_it(boot: Path, etc: Path) -> None:
    (boot / "kiosk.toml").unlink()
    (boot / "merchant_private_key.pem").unlink()
    (boot / "kiosk-keygen.txt").write_text("bits = 2048\n")

    report = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert report.status == "nothing_to_do" and report.keygen is not None
    private = (etc / "keys/merchant_private_key.pem").read_bytes()
    assert mode_of(etc / "keys/merchant_private_key.pem") == 0o600
    assert b"BEGIN PUBLIC KEY" in (boot / "merchant_public_key.pem").read_bytes()
    assert (boot / "kiosk-keygen.txt.done").exists()
    assert not any(PRIVATE_MARK in p.read_bytes() for p in boot.iterdir())

    (boot / "kiosk-keygen.txt").write_text("again\n")
    again = provision(boot / "kiosk.toml", etc, owner=None, group=None)

    assert again.keygen is not None and not again.keygen.new
    assert (etc / "keys/merchant_private_key.pem").read_bytes() == private


PRIVATE_MARK = b"PRIVATE KEY"
