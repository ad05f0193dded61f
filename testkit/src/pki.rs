//! Certificates for the TLS tests, made with the openssl CLI in a directory of their own: a CA, a server
//! certificate for 127.0.0.1 and localhost, a client certificate, both signed by the CA, and a second CA that
//! signed neither. EC P-256 keys: quick to make, and every server and client here takes them.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use crate::servers::temp_dir;

/// The files, removed on drop.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes them; the client certificate's common name is `client_name` (Postgres takes it as the role).
    pub fn create(client_name: &str) -> Self {
        let pki = Self { dir: temp_dir("pki") };
        pki.authority("ca");
        pki.authority("other-ca");
        pki.issue(
            "server",
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
        );
        pki.issue("client", client_name, "extendedKeyUsage=clientAuth");
        pki
    }

    /// `<name>.pem`: `ca`, `server`, `client` and their keys `ca-key`, `server-key`, `client-key`; and
    /// `other-ca`, a CA that signed nothing here, so that trusting it alone must fail every handshake.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    /// [`Self::path`] as settings and command lines take it.
    pub fn text(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn authority(&self, name: &str) {
        self.openssl(&format!(
            "req -x509 {NEW_KEY} -days 2 -keyout {name}-key.pem -out {name}.pem -subj /CN={name} \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        ));
    }

    fn issue(&self, name: &str, common_name: &str, extensions: &str) {
        self.openssl(&format!(
            "req {NEW_KEY} -keyout {name}-key.pem -out {name}.csr -subj /CN={common_name}"
        ));
        fs::write(self.dir.join(format!("{name}.ext")), format!("basicConstraints=CA:FALSE\n{extensions}\n"))
            .expect("write the extensions");
        self.openssl(&format!(
            "x509 -req -in {name}.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 2 -out {name}.pem \
             -extfile {name}.ext"
        ));
    }

    /// Runs `openssl` in the directory with `args`, split at whitespace (none holds any).
    fn openssl(&self, args: &str) {
        let out = Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(&self.dir)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A new EC P-256 key, unencrypted.
const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
