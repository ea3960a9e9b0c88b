#!/usr/bin/env bash
# tls-certs.sh DIR [HOSTNAME] - make a private CA, a server certificate for HOSTNAME (default: this host's
# name, plus localhost and 127.0.0.1) and a client certificate, in the layout qemu, qnbd and libnbd read:
#   DIR/server: ca-cert.pem server-cert.pem server-key.pem   (qnbd --object tls-creds-x509,dir=DIR/server,...)
#   DIR/client: ca-cert.pem client-cert.pem client-key.pem   (qemu-img --object ...,endpoint=client; nbdinfo tls-certificates=)
# Needs openssl. Certificates are valid for 365 days; the CA key stays in DIR/ca-key.pem.
set -euo pipefail
DIR=${1:?usage: tls-certs.sh DIR [HOSTNAME]}
HOST=${2:-$(hostname -f 2>/dev/null || hostname)}
mkdir -p "$DIR/server" "$DIR/client"
cd "$DIR"
ossl() { openssl "$@" 2>/dev/null; }
ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -subj "/CN=qnbd CA" \
  -keyout ca-key.pem -out ca-cert.pem \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
leaf() {  # name subject extensions
  ossl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" -keyout "$1-key.pem" -out "$1.csr"
  printf '%s\n' "$3" > "$1.ext"
  ossl x509 -req -in "$1.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 365 -extfile "$1.ext" -out "$1-cert.pem"
  rm -f "$1.csr" "$1.ext"
}
leaf server "/CN=$HOST" "basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:$HOST,DNS:localhost,IP:127.0.0.1"
leaf client "/O=qnbd/CN=client" "basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
mv server-cert.pem server-key.pem server/
mv client-cert.pem client-key.pem client/
cp ca-cert.pem server/; cp ca-cert.pem client/
chmod 600 server/server-key.pem client/client-key.pem ca-key.pem
echo "made $DIR/server and $DIR/client (server name: $HOST, localhost, 127.0.0.1; client: O=qnbd, CN=client)"
