//! Certificates for the TLS tests, made with the openssl CLI in a directory of their own: a CA, a server
//! certificate for 127.0.0.1 and localhost, a client certificate, both signed by the CA, and a second CA that
//! signed neither. EC P-256 keys: quick to make, and every server and client here takes them.
// Each includer uses its own subset of these helpers.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use uuid::Uuid;

/// The files, removed on drop.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// Makes them; the client certificate's common name is `client_name` (Postgres takes it as the role).
    pub fn create(client_name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("qxr-pki-{}", Uuid::new_v4().simple()));
        fs::create_dir_all(&dir).expect("create the pki dir");
        let pki = Self { dir };
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

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A CA that signed nothing here: trusting it alone must fail every handshake.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client-key.pem")
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

/// `path` as settings take it.
pub fn text(path: &Path) -> String {
    path.display().to_string()
}
