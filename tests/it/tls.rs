//! TLS to PostgreSQL: a server with a certificate from a throwaway CA, and each sslmode.

use crate::support::pg::Cluster;
use crate::support::{pipewatch_cmd, text};
use std::path::Path;
use std::process::Command;

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it; returns the CA path.
fn make_certs(dir: &Path) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=pipewatch test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        dir,
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
        dir,
    );
    // A second, unrelated CA.
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=other CA",
            "-keyout",
            "other.key",
            "-out",
            "other.crt",
        ],
        dir,
    );
}

#[test]
fn sslmodes_against_a_server_with_a_self_signed_ca() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let cluster = Cluster::start_with(
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        |data| {
            for f in ["server.crt", "server.key"] {
                std::fs::copy(certs.path().join(f), data.join(f)).unwrap();
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            // Only the admin database may be reached without TLS (the harness creates databases
            // through it); every other database requires TLS.
            std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostnossl postgres all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        },
    );
    let base = cluster.create_db();
    let ca = certs.path().join("ca.crt");
    let other = certs.path().join("other.crt");
    let url = |q: &str| base.replace("sslmode=disable", q);
    let status = |u: &str| {
        let out = pipewatch_cmd(&["--database-url", u, "migrate", "--check-only"])
            .output()
            .unwrap();
        let (o, e) = text(&out);
        (out.status.code(), format!("{o}{e}"))
    };
    // verify-full with the right CA: connects (check-only then reports the missing schema: 1).
    let ok = url(&format!("sslmode=verify-full&sslrootcert={}", ca.display()));
    let (code, out) = status(&ok);
    assert_eq!(code, Some(1), "{out}");
    assert!(!out.contains("cannot connect"), "{out}");
    // The server refuses this database without TLS, so the connection above used TLS. The
    // refusal (28000) is a configuration error: exit 2.
    let (code, out) = status(&base);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("cannot log in")
            && out.contains("no encryption")
            && out.contains("pg_hba.conf"),
        "{out}"
    );
    // verify-full with another CA: refused, with a clear message.
    let (code, out) = status(&url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        other.display()
    )));
    assert_eq!(code, Some(1));
    assert!(
        out.contains("cannot connect") && out.to_lowercase().contains("certificate"),
        "{out}"
    );
    // verify-ca with the right CA connects.
    let (_, out) = status(&url(&format!(
        "sslmode=verify-ca&sslrootcert={}",
        ca.display()
    )));
    assert!(!out.contains("cannot connect"), "{out}");
    // require without a CA: encrypted, unverified (libpq semantics).
    let (_, out) = status(&url("sslmode=require"));
    assert!(!out.contains("cannot connect"), "{out}");
    // A missing CA file is named.
    let (code, out) = status(&url("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"));
    assert_eq!(code, Some(1));
    assert!(out.contains("/nonexistent/ca.pem"), "{out}");
}
