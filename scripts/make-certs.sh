#!/usr/bin/env bash
# Make a private CA, a broker (server) certificate and client certificates with openssl.
#
#   scripts/make-certs.sh OUT_DIR [CLIENT_NAME...]
#
# OUT_DIR gets:
#   ca.pem ca.key                 the CA (keep ca.key offline in production)
#   server.pem server.key         the broker's certificate, for RabbitMQ and Mosquitto
#   client-NAME.pem client-NAME.key   one per client name (default: aggregator operator dev-01 dev-02)
#   .gitignore                    "*": nothing generated here can be committed by accident
#
# Environment:
#   FEDMQ_CERT_HOSTS  extra subjectAltNames for the server certificate, space separated,
#                     e.g. "DNS:broker.example.org IP:192.0.2.10". Always included:
#                     DNS:localhost DNS:rabbitmq DNS:mosquitto IP:127.0.0.1 IP:::1
#   FEDMQ_CERT_DAYS   validity of the leaf certificates in days (default 825; the CA gets 3650)
#   FEDMQ_KEY_MODE    file mode of the private keys (default 0600). The broker containers
#                     read the server key as their own user (rabbitmq: uid 999, mosquitto:
#                     uid 1883): chown the key to that uid, or use 0644 for the local demo only.
#
# An existing CA in OUT_DIR is reused (so rotating the server certificate does not
# invalidate every client's trust store); delete ca.* to start a new CA.
# Keys are EC P-256: fast to make, and accepted by Erlang/OTP, OpenSSL and Python's ssl.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

out=$1
shift
clients=("$@")
if [[ ${#clients[@]} -eq 0 ]]; then
    clients=(aggregator operator dev-01 dev-02)
fi
days=${FEDMQ_CERT_DAYS:-825}
key_mode=${FEDMQ_KEY_MODE:-0600}
sans="DNS:localhost,DNS:rabbitmq,DNS:mosquitto,IP:127.0.0.1,IP:0:0:0:0:0:0:0:1"
for extra in ${FEDMQ_CERT_HOSTS:-}; do
    sans="$sans,$extra"
done

mkdir -p "$out"
printf '*\n' >"$out/.gitignore"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077

new_key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    chmod "$key_mode" "$1"
}

if [[ ! -f "$out/ca.pem" || ! -f "$out/ca.key" ]]; then
    new_key "$out/ca.key"
    openssl req -x509 -new -key "$out/ca.key" -sha256 -days 3650 \
        -subj "/O=fedmq/CN=fedmq demo CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$out/ca.pem"
fi

# sign NAME SUBJECT EXTENSIONS: makes NAME.key and NAME.pem signed by the CA
sign() {
    local name=$1 subject=$2 extensions=$3
    new_key "$out/$name.key"
    openssl req -new -key "$out/$name.key" -subj "$subject" -out "$work/$name.csr"
    printf '%b' "$extensions" >"$work/$name.ext"
    openssl x509 -req -in "$work/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
        -CAcreateserial -CAserial "$work/ca.srl" -sha256 -days "$days" \
        -extfile "$work/$name.ext" -out "$out/$name.pem" 2>/dev/null
}

sign server "/O=fedmq/CN=fedmq broker" \
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=$sans\n"
for client in "${clients[@]}"; do
    sign "client-$client" "/O=fedmq/CN=$client" \
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
done
chmod 0644 "$out"/*.pem

openssl verify -CAfile "$out/ca.pem" "$out/server.pem" >/dev/null
echo "certificates written to $out (CA, server, clients: ${clients[*]})"
